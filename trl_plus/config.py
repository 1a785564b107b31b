"""YAML recipes: the schema of a run, reading YAML, ``--set`` overrides and one-line error messages.

Pure data: nothing here needs the installed methods (``trl_plus.run.validate`` checks what does).

Precedence: the method's defaults < the YAML file < ``--set key.path=value`` overrides. Every error names the
file, the key path and the expected type or choices (with the nearest key for a typo).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import TrlPlusError, did_you_mean

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizationSpec(_Block):
    """4-bit QLoRA loading through bitsandbytes."""

    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    #: peft's ``prepare_model_for_kbit_training`` casts the weights it does not quantise (embeddings, norms,
    #: ``lm_head``) to float32, which also makes the residual stream float32 (twice the activations). ``false`` keeps
    #: them in the model's dtype (QLoRA's LoRA-only gradients are unaffected; norms then compute in bf16): a 7B DPO
    #: recipe at 2,048 tokens drops from 10.9 to under 10 GB predicted (``trl-plus estimate``).
    upcast: bool = True


def parse_layers(value: Any) -> Any:
    """``"19-23,24,25"`` -> ``[19, 20, 21, 22, 23, 24, 25]`` (ranges inclusive, sorted, no repeats); a list of
    numbers or ranges is read the same way; anything else is left for the schema to reject."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [part for part in value.replace(" ", "").split(",") if part]
    if not isinstance(value, list):
        return value
    layers: set[int] = set()
    for part in value:
        if isinstance(part, int) and not isinstance(part, bool):
            layers.add(part)
            continue
        text = str(part).strip()
        first, dash, last = text.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"{text!r} is not a layer number or a range like 19-23 (write e.g. \"19-23,24,25\")")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"the range {text!r} runs backwards: write {high}-{low}")
        layers.update(range(low, high + 1))
    return sorted(layers)


class LoraSpec(_Block):
    """LoRA adapters; ``layers`` restricts them to those decoder layers (SAIL-style layer-targeted LoRA), as numbers
    or ranges: ``[19, 20, 21]`` or ``"19-21"`` or ``"19-23,24,25"``."""

    r: PositiveInt = 16
    alpha: float = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    _parse_layers = field_validator("layers", mode="before")(classmethod(lambda cls, value: parse_layers(value)))


class AdapterSpec(LoraSpec):
    """One of several named trainable LoRA adapters (``model.adapters.<name>``): LoRA's fields plus ``lr_scale``, its
    learning rate as a multiple of ``training.learning_rate`` (its own optimiser parameter group)."""

    lr_scale: float = Field(1.0, gt=0)


class ComponentSpec(_Block):
    """A diffusion pipeline's frozen component (``model.vae``): its subfolder and dtype."""

    subfolder: str | None = None
    dtype: Dtype = "auto"


class TextEncodersSpec(_Block):
    """A diffusion pipeline's text encoders (frozen; each unique prompt is encoded once, then they are freed)."""

    dtype: Dtype = "auto"


class SchedulerSpec(_Block):
    """A diffusion pipeline's training scheduler (DDPM-style: ε / v targets; flow matching: the velocity)."""

    subfolder: str = "scheduler"


class CacheSpec(_Block):
    """What a diffusion run caches: text embeddings per unique prompt (always) and the VAE latents: ``auto`` keeps
    them in memory while the run's images fit ``latents_budget`` (bytes, or a size such as ``4GiB``, ``500MB``) and
    else re-encodes every batch; ``true`` / ``false`` force one path (:mod:`trl_plus.diffusion.latents`)."""

    text: bool = True
    latents: Literal["auto"] | bool = "auto"
    latents_budget: ByteSize = Field(ByteSize(4 * 1024**3), gt=0)

    @field_validator("latents", mode="before")
    @classmethod
    def _latents(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError("expected auto, true or false")
        return value


#: The ``model`` keys of a diffusion pipeline (``model.kind: diffusion``), refused on a causal LM.
DIFFUSION_MODEL_KEYS = ("denoiser", "vae", "text_encoders", "scheduler", "resolution", "cache")


class ModelSpec(_Block):
    """The policy: a hub name, a local directory, or a registered alias (``trl-plus list`` shows them).

    ``gguf_file`` loads a GGUF file (a name inside ``name_or_path``, or a path to the file): it is dequantised once
    into a plain trainable checkpoint, cached by the file's hash (``$TRL_PLUS_CACHE/gguf``) and reused.

    ``kind: diffusion`` makes it a diffusers pipeline folder (or alias: ``tiny-sd``, ``tiny-sd3``, ``tiny-flux``)
    whose ``denoiser`` (subfolder: ``unet`` / ``transformer``, read from ``model_index.json`` by default) trains;
    ``dtype``, ``quantization`` and ``lora`` are the denoiser's; ``resolution`` resizes and center-crops images.
    """

    name_or_path: str
    kind: Literal["causal-lm", "diffusion"] = "causal-lm"
    denoiser: str | None = None
    vae: ComponentSpec | None = None
    text_encoders: TextEncodersSpec | None = None
    scheduler: SchedulerSpec | None = None
    resolution: PositiveInt | None = None
    cache: CacheSpec | None = None
    gguf_file: str | None = None
    dtype: Dtype = "auto"
    quantization: QuantizationSpec | None = None
    lora: LoraSpec | None = None
    adapters: dict[str, AdapterSpec] | None = None  # several named trainable LoRA adapters (instead of lora)
    gradient_checkpointing: bool | None = None  # None: TRL's default (on)
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    @model_validator(mode="after")
    def _diffusion_keys(self) -> ModelSpec:
        given = [key for key in DIFFUSION_MODEL_KEYS if getattr(self, key) is not None]
        if self.kind != "diffusion" and given:
            raise ValueError(f"{', '.join(given)}: keys of a diffusion pipeline; set model.kind: diffusion (or drop "
                             "them)")  # fmt: skip
        if self.kind == "diffusion" and self.gguf_file is not None:
            raise ValueError("gguf_file: a diffusion pipeline is a diffusers folder, not a GGUF file")
        if self.adapters is not None:
            if self.lora is not None:
                raise ValueError("adapters: give either lora (one adapter) or adapters (several named ones), not both")
            if not self.adapters:
                raise ValueError("adapters: name at least one adapter, e.g. adapters: {fast: {r: 16, lr_scale: 4.0}}")
            if self.kind == "diffusion":
                raise ValueError("adapters: named trainable adapters are for causal LMs; use lora")
        return self

    @property
    def uses_lora(self) -> bool:
        """Whether the policy trains LoRA adapters (``lora`` or ``adapters``)."""
        return self.lora is not None or bool(self.adapters)


class ReferenceSpec(_Block):
    """Where reference log-probs come from (``auto`` picks adapter-off for LoRA, else a frozen copy)."""

    mode: Literal["auto", "model", "adapter", "precomputed", "none"] = "auto"
    name_or_path: str | None = None  # a different reference model (default: the policy's starting weights)
    gguf_file: str | None = None  # with name_or_path: a GGUF reference (see ModelSpec)
    dtype: Dtype | None = None


class TeacherSpec(_Block):
    """A frozen teacher (``teachers.<name>``, or the one ``teacher:`` block): a model (``name_or_path``, loaded
    frozen: its own ``dtype`` and ``quantization``) or a LoRA ``adapter`` folder loaded frozen onto the policy's own
    base (its bytes, not a second base: the policy needs ``model.lora``). ``mode: precomputed`` computes its label
    log-probs / top-k once before training into cached columns (``$TRL_PLUS_CACHE/columns``, reused by later runs
    on the same data and weights); ``live`` runs it at every step."""

    name_or_path: str | None = None
    adapter: str | None = None
    gguf_file: str | None = None
    dtype: Dtype = "auto"
    quantization: QuantizationSpec | None = None
    mode: Literal["live", "precomputed"] = "live"

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.name_or_path is None) == (self.adapter is None):
            raise ValueError("give one of name_or_path (a model) or adapter (a LoRA adapter folder on the policy's "
                             "base)")  # fmt: skip
        if self.adapter is not None and (self.quantization is not None or self.gguf_file is not None):
            raise ValueError("an adapter teacher rides the policy's base (its quantization): drop quantization and "
                             "gguf_file here")  # fmt: skip
        return self


class DataSource(_Block):
    """One data file or hub dataset. ``columns`` maps the method's column names to the file's, e.g.
    ``{completion: chosen}`` trains ``sft`` on the chosen answers of a preference file. ``name`` is a hub dataset's
    configuration (``load_dataset(path, name)``; e.g. one of Egida's seven)."""

    path: str
    name: str | None = None
    split: str = "train"
    limit: PositiveInt | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    label: str | None = None  # diffusion pairs: a Pick-a-Pic label column (label_0: 1 first wins, 0 second, 0.5 tie)


class StagesSpec(_Block):
    """Which training stages run (see ``trl_plus.Stage``): the method's own, or one per value of a data column
    (``by: stage``); ``only`` runs a subset by name; ``refresh_reference`` overrides whether each stage after the
    first starts with π_ref ← π_θ."""

    by: str | None = None
    only: list[str | int] | None = None  # stage names (a number names the stage of that value of ``by``)
    refresh_reference: bool | None = None


class DataSpec(_Block):
    """Training pairs and, optionally, held-out pairs: ``eval`` feeds TRL's evaluation loop (``eval_steps``) and,
    with ``report: true``, the before/after table ``trl-plus train`` prints (see ``trl_plus.run.evaluate``)."""

    train: DataSource
    eval: DataSource | dict[str, DataSource] | None = None  # one set, or named sets: {in_domain: ..., shifted: ...}
    report: bool = True
    ties: Literal["drop", "keep_as_soft"] = "drop"  # diffusion pairs labelled 0.5: dropped (official) or soft


    @field_validator("eval", mode="before")
    @classmethod
    def _one_or_named(cls, value: Any) -> Any:
        """A mapping with ``path`` is one set; any other mapping names several (each a data source)."""
        if isinstance(value, dict) and "path" not in value and not all(isinstance(v, dict) for v in value.values()):
            raise ValueError("expected one data source (with a path) or named sets, each a data source: "
                             "{in_domain: {path: ...}, shifted: {path: ...}}")
        return value

    def eval_sets(self) -> dict[str, DataSource]:
        """The held-out sets by name (``{"eval": source}`` for a single ``data.eval``); the first one is TRL's
        evaluation set and the before/after table's."""
        if self.eval is None:
            return {}
        return {"eval": self.eval} if isinstance(self.eval, DataSource) else dict(self.eval)

    @property
    def primary_eval(self) -> DataSource | None:
        """The first held-out set (``None`` without ``data.eval``)."""
        return next(iter(self.eval_sets().values()), None)


class MetricSpec(_Block):
    """A metric run at every evaluation and by ``trl-plus eval`` (``trl-plus list --metrics`` lists them)."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class ScorerSpec(_Block):
    """A scorer of an online run's samples (``trl-plus list --scorers``), its arguments and its weight in the
    reward (the weighted sum of every scorer's outputs): one number for all its outputs, or a list with one per
    output (a vector scorer: ``[1.0, 0.0]`` logs the second output without rewarding it)."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    weight: float | list[float] = 1.0


class EnvironmentSpec(_Block):
    """A multi-turn environment the rollouts play (``trl-plus list --environments``) and its arguments
    (``max_turns`` and the environment's own)."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class RolloutSpec(_Block):
    """An online method's sampling (its ``Needs.rollout`` by default): completions per prompt and source, the
    sources (``policy``, ``reference``, ``column:<name>``), decoding settings (``transformers.GenerationConfig``
    fields, merged over the method's), the scorers that rank them and, for a group method, the multi-turn
    ``environment`` each sample plays as an episode."""

    n: PositiveInt | None = None
    sources: list[str] | None = None
    when: Literal["step", "iteration"] | None = None  # "iteration": with an ``iterations:`` block (its default)
    decoding: dict[str, Any] = Field(default_factory=dict)
    missing_eos_penalty: Annotated[float, Field(ge=0)] | None = None  # subtracted from samples without EOS (TRL)
    scorers: list[ScorerSpec] = Field(default_factory=list)
    environment: EnvironmentSpec | None = None
    every: PositiveInt | None = None  # diffusion methods: fresh samples every `every` optimizer steps


class IterationsSpec(_Block):
    """Batched iterations of an online method (SELM, DNO, DPA; any online method becomes "iterative"): per
    iteration, sample this iteration's prompts with the current policy, score, build the rows (plus the replayed
    rows of earlier iterations), promote the policy to reference, and train on the rows with a fresh optimiser and
    that iteration's ``training`` overrides, under ``output_dir/iter-<t>/``.

    - ``prompts``: ``slices`` (disjoint, contiguous, one per iteration: SELM, DNO) or ``all`` (every prompt every
      iteration);
    - ``reference``: ``previous`` (π_ref ← the policy at the end of the last iteration; the default with a
      reference) or ``initial``;
    - ``training``: one mapping of ``training`` keys per iteration (fewer: the rest use the recipe's);
    - ``replay``: fractions of the rows of iteration t−1, t−2, ... added to iteration t's (DNO: ``[0.3, 0.15]``).
    """

    count: PositiveInt = 3
    prompts: Literal["slices", "all"] = "slices"
    reference: Literal["previous", "initial"] | None = None
    training: list[dict[str, Any]] = Field(default_factory=list)
    replay: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=list)


class StopRule(_Block):
    """Stop when a logged value reaches a bound: ``key`` (a training log entry, e.g. ``rollout/reward`` or
    ``rewards/kitchen/team/mean``) ``at_least`` or ``at_most`` a number (exactly one); ``window``: the mean of its
    last ``window`` logged values (one batch's value is noisy; 1: the last value alone)."""

    key: str
    at_least: float | None = None
    at_most: float | None = None
    window: PositiveInt = 1

    @model_validator(mode="after")
    def _one_bound(self) -> StopRule:
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least and at_most")
        return self

    def reached(self, values: float | list[float]) -> bool:
        """Whether the mean of the last ``window`` of ``values`` (logged in order; or one value) satisfies the rule;
        fewer than ``window`` values never do."""
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) < self.window:
            return False
        value = sum(values[-self.window :]) / self.window
        return value >= self.at_least if self.at_least is not None else value <= self.at_most


class PhaseSpec(_Block):
    """One phase of a ``phases:`` round: a method (default: the recipe's) trained on the current policy with its own
    ``method_args``, training data (``data``: a file or source; default: the recipe's ``data.train``), ``rollout``
    and ``training`` overrides, stopped early by ``until`` (checked at every logged step)."""

    name: str
    method: str | None = None
    method_args: dict[str, Any] = Field(default_factory=dict)
    data: DataSource | None = None
    rollout: RolloutSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    until: StopRule | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _a_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class PhasesSpec(_Block):
    """Rounds of phases (EAR: one BC epoch on liked data, then RL until the return is back): each round runs
    ``sequence`` in order on the policy the last phase left, under ``output_dir/round-<r>-<name>/``; ``until`` ends
    the rounds early, checked on the values of its key logged in the round (the last ``window`` of them); ``rounds``
    caps them."""

    rounds: PositiveInt = 1
    sequence: list[PhaseSpec]
    until: StopRule | None = None

    @field_validator("sequence")
    @classmethod
    def _named_once(cls, value: list[PhaseSpec]) -> list[PhaseSpec]:
        names = [p.name for p in value]
        if not names:
            raise ValueError("give at least one phase")
        if len(set(names)) != len(names):
            raise ValueError(f"phase names repeat: {names}")
        return value


class Recipe(_Block):
    """A whole run. ``training`` takes any ``trl.DPOConfig`` field except the loss fields the method owns."""

    method: str
    method_args: dict[str, Any] = Field(default_factory=dict)
    model: ModelSpec
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    teacher: TeacherSpec | None = None  # the teacher of a method with one (``teachers: {teacher: ...}``)
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    data: DataSpec
    stages: StagesSpec | None = None
    metrics: list[MetricSpec] = Field(default_factory=list)
    rollout: RolloutSpec | None = None
    iterations: IterationsSpec | None = None
    phases: PhasesSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)

    _source: str = PrivateAttr("<recipe>")  # the file it came from
    _overridden: tuple[str, ...] = PrivateAttr(())  # key paths set by --set

    @model_validator(mode="after")
    def _one_teacher_block(self) -> Recipe:
        if self.teacher is not None and "teacher" in self.teachers:
            raise ValueError("the teacher is given twice, as teacher: and as teachers.teacher: keep one")
        return self

    def teacher_blocks(self) -> list[tuple[str, str, TeacherSpec]]:
        """``(key path, teacher name, spec)`` of every teacher: ``("teacher", "teacher", ...)`` for the one-teacher
        block, ``("teachers.guide", "guide", ...)`` for named ones."""
        blocks = [("teacher", "teacher", self.teacher)] if self.teacher is not None else []
        return blocks + [(f"teachers.{name}", name, spec) for name, spec in self.teachers.items()]


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic block class found by walking ``loc`` down from :class:`Recipe`."""
    model: Any = Recipe
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def explain(error: ValidationError, source: str, prefix: tuple = (), model: type[BaseModel] | None = None,
            overridden: tuple[str, ...] = ()) -> str:  # fmt: skip
    """One line per problem: ``file: key.path: what is wrong`` (``--set key.path: ...`` for a key set by ``--set``)."""
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
        key = _format_loc(prefix + loc)
        where = f"--set {key}" if is_overridden(key, overridden) else f"{source}: {key}"
        if err["type"] == "extra_forbidden":
            parent = model if model is not None and len(loc) == 1 else _model_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), parent.model_fields) if parent else ""
            lines.append(f"{where}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
    return "\n".join(dict.fromkeys(lines))


def is_overridden(key: str, overridden: tuple[str, ...]) -> bool:
    """Whether ``key`` (``a.b.c``) was set by one of the ``--set`` key paths (itself or a block above it)."""
    return any(key == path or key.startswith(path + ".") for path in overridden)


def locate(recipe: Recipe, key: str) -> str:
    """Where an error about ``key`` points: ``recipe.yaml: key`` or, for a value given on the command line,
    ``--set key``."""
    return f"--set {key}" if is_overridden(key, recipe._overridden) else f"{recipe._source}: {key}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as YAML, so numbers and booleans keep their type)."""
    if "=" not in item:
        raise TrlPlusError(f"--set {item}: expected key.path=value, e.g. --set training.max_steps=10")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TrlPlusError(f"--set {item}: the value is not valid YAML ({problem}); quote it as text, e.g. "
                           f"--set \"{key.strip()}='...'\"") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in the nested ``data`` dict (creating blocks as needed)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise TrlPlusError(f"--set {item}: {part} is not a block")
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file with a safe loader; a clear error when it is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise TrlPlusError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TrlPlusError(yaml_error(path, exc)) from None
    if not isinstance(data, dict):
        raise TrlPlusError(f"{path}: a recipe must be a mapping with keys method, model, data, ...")
    return data


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    """``recipe.yaml: line 3, column 5: not valid YAML: expected ',' or '}', but got ':' (...)``: where the parser
    stopped, what it expected, and the fix."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return (f"{path}: {where}not valid YAML: {problem}; check the indentation, brackets and quotes there "
            "(a value with ': ' or '#' in it needs quotes)")


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read (a file or a dict), apply ``--set`` overrides and validate the recipe's structure and types.

    A relative local data or model path in a recipe file is read from the recipe's folder (then, for recipes
    written before 0.2, from the working directory); a path given with ``--set`` from the working directory. The method
    name, its ``method_args`` and the ``training`` block are checked by :func:`trl_plus.run.validate.check_recipe`
    (they depend on installed code).
    """
    name = "<recipe>" if isinstance(source, dict) else str(source)
    data = dict(source) if isinstance(source, dict) else read_yaml(source)
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    overridden = tuple(".".join(parse_override(item)[0]) for item in overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, name, overridden=overridden)) from None
    recipe._source, recipe._overridden = name, overridden
    if not isinstance(source, dict):
        folder = Path(source).parent
        named = isinstance(recipe.data.eval, dict)
        sources = [("data.train", recipe.data.train), *((f"data.eval.{n}" if named else "data.eval", spec)
                                                        for n, spec in recipe.data.eval_sets().items())]  # fmt: skip
        if recipe.phases is not None:
            sources += [(f"phases.sequence.{i}.data", phase.data) for i, phase in enumerate(recipe.phases.sequence)
                        if phase.data is not None]  # fmt: skip
        for key, spec in sources:
            if not is_overridden(f"{key}.path", overridden):
                spec.path = relative_to_recipe(spec.path, folder)
        blocks = [("model", recipe.model), ("reference", recipe.reference)]
        for key, _, spec in recipe.teacher_blocks():
            blocks.append((key, spec))
        for key, spec in blocks:
            for name in ("name_or_path", "gguf_file", "adapter"):
                value = getattr(spec, name, None) if spec is not None else None
                if value and not is_overridden(f"{key}.{name}", overridden):
                    setattr(spec, name, relative_to_recipe(value, folder))
    return recipe


def relative_to_recipe(path: str, folder: Path) -> str:
    """``path`` read from the recipe's ``folder`` when that file exists there (as a path from the working directory
    when it lies below it, else absolute); otherwise ``path`` unchanged (the working directory, or a hub name)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or not (folder / candidate).exists():
        return path
    found = (folder / candidate).resolve()
    try:
        return str(found.relative_to(Path.cwd()))
    except ValueError:
        return str(found)


def recipe_source(recipe: Recipe) -> str:
    """The file a recipe came from (for error messages)."""
    return recipe._source
