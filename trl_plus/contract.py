"""The plugin contract of trl-plus: every hook a plugin can implement and every type a hook registers.

This module is the documentation of record (read it top to bottom: the hooks, then what a method is).

A plugin is a Python module listed under the entry-point group ``trl_plus`` (distribution ``trl-plus-<method>``,
module ``trl_plus_<method>``, entry-point name = method name). trl-plus imports it, registers it with pluggy and
calls the hooks below. The core's own methods (``dpo``, ``sft``) and model aliases are registered through the very
same hooks (``trl_plus/builtin/``).

Discovery order: the core's built-ins first, then installed entry points in the order ``importlib.metadata``
returns them. Set ``TRL_PLUS_PLUGINS=name1,name2`` to load only those entry points (``TRL_PLUS_PLUGINS=`` loads
none); a plugin that fails to import is recorded as broken and never hides the others.

A plugin imports only ``trl_plus`` (and ``trl_plus.testing`` in its tests) and keeps its top-level imports light
(``trl_plus``, ``pydantic`` and the standard library; ``torch`` inside functions) so that ``trl-plus list`` and
``--help`` stay fast. Nothing here imports torch at module level.

What a method is: a subclass of :class:`Method`. Only the loss is mandatory; everything else has a default that
fits offline pairwise methods (DPO and its many edits). The loss is a pure function of a :class:`LossContext`,
which holds what the trainer computed, so most plugin tests run on hand-made tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, Field

from .errors import TrlPlusError, did_you_mean

if TYPE_CHECKING:
    import torch

# -- the hooks ----------------------------------------------------------------------------------------------------

hookspec = pluggy.HookspecMarker("trl_plus")
hookimpl = pluggy.HookimplMarker("trl_plus")


@hookspec
def register_methods(register: Callable[[type[Method]], None]) -> None:
    """Register preference-optimization methods.

    Called once per plugin when the registry loads. Call ``register(MethodClass)`` once per method, with a
    subclass of :class:`trl_plus.Method` (not an instance: trl-plus instantiates it with the validated
    ``method_args`` of a recipe). Registering a name twice, from the same or another plugin, is an error that
    names both sources. The return value is ignored.

    Example::

        from trl_plus import Method, hookimpl

        class MyMethod(Method):
            name = "my-method"
            ...

        @hookimpl
        def register_methods(register):
            register(MyMethod)
    """


@hookspec
def register_model_aliases(register: Callable[[ModelAlias], None]) -> None:
    """Register short model names usable as ``model.name_or_path`` in a recipe.

    Call ``register(ModelAlias(name, description, build))`` where ``build(cache_dir: pathlib.Path) -> str``
    returns a local directory that ``from_pretrained`` can load (it may create it on first use and reuse it
    afterwards). Duplicate alias names are an error. The return value is ignored.
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Add ``trl-plus`` subcommands (``trl-plus sail localize``, ``trl-plus tracealign index``).

    Call ``register(name, help, add_arguments, run)`` once per command: ``name`` is one word or two
    (``"sail localize"``: the first word groups a plugin's commands), ``help`` one line shown by
    ``trl-plus --help``, ``add_arguments(parser)`` adds the command's ``argparse`` arguments and
    ``run(args) -> int`` does the work (its return value is the exit status; raise :class:`trl_plus.TrlPlusError`
    for a one-line error). Keep the plugin module's imports light: the hook runs for every ``trl-plus --help``.
    A name the core or another plugin already uses is an error naming both. The return value is ignored.

    Example::

        @hookimpl
        def register_commands(register):
            register("sail localize", "find the focal layers", add_arguments, run)
    """


@hookspec
def register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register evaluation metrics (``trl-plus eval --metric``, the recipe's ``metrics:``).

    Call ``register(MetricClass)`` once per metric, with a subclass of :class:`trl_plus.Metric`. A name registered
    twice is an error naming both sources. The return value is ignored.
    """


@hookspec
def register_scorers(register: Callable[[type[Scorer]], None]) -> None:
    """Register frozen text scorers (``trl-plus score --scorer``; later the online trainers' rewards and judges).

    Call ``register(ScorerClass)`` once per scorer, with a subclass of :class:`trl_plus.Scorer`. A name registered
    twice is an error naming both sources. The return value is ignored.
    """


@hookspec
def register_environments(register: Callable[[type[Environment]], None]) -> None:
    """Register multi-turn text environments a group method's rollouts play (the recipe's ``rollout.environment``).

    Call ``register(EnvironmentClass)`` once per environment, with a subclass of :class:`trl_plus.Environment`. A
    name registered twice is an error naming both sources. The return value is ignored.
    """


# -- what a hook registers ----------------------------------------------------------------------------------


class MethodConfig(BaseModel):
    """Base class of a method's hyperparameters.

    Declare each hyperparameter as a typed field with the paper's default and a description, e.g.
    ``beta: float = Field(0.1, gt=0, description="inverse KL strength (paper: 0.1)")``. Unknown keys and wrong
    types are rejected; the recipe's ``method_args`` are validated against this class before any model loads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


@dataclass(frozen=True)
class Paper:
    """The paper a method comes from: its arXiv id, or (a paper without one) ``arxiv=None`` and its ``venue`` and
    ``url`` (e.g. an OpenReview page)."""

    title: str
    arxiv: str | None
    code: str | None = None  # official code repository, "owner/name"
    venue: str | None = None
    url: str | None = None

    @property
    def where(self) -> str:
        """``arXiv <id>``, or the venue (and the page) of a paper without an arXiv id."""
        if self.arxiv:
            return f"arXiv {self.arxiv}"
        return ", ".join(x for x in (self.venue, self.url) if x) or "no arXiv id"

    @property
    def link(self) -> str | None:
        """The paper's page: its arXiv abstract, or ``url``."""
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else self.url

    def __str__(self) -> str:
        return f"{self.title} ({self.where})"


@dataclass(frozen=True)
class ListField:
    """A ragged per-example list column (see ``Needs.list_fields``).

    - ``dtype``: ``"float"`` or ``"int"``, the values' type (and the collated tensor's); ``"text"`` for a list of
      strings the method's tokenization reads (K completions, K items): checked, never collated. (Text columns
      holding one string or chat messages are ``Method.data_fields``.)
    - ``same_length_as``: another list column of the same row whose length this one must have (``"completions"``:
      one reward per completion); ``None``: any length.
    - ``required``: ``False`` for a column used only when the data has it (collated when every row of a batch has
      it, absent from ``ctx.batch`` otherwise).
    - ``pad``: the value of padded entries (their mask is ``False`` whatever it is).
    """

    name: str
    dtype: Literal["float", "int", "text"] = "float"
    same_length_as: str | None = None
    required: bool = True
    pad: float = 0


@dataclass(frozen=True)
class Stage:
    """One training stage (see :meth:`Method.stages`): stages run in order, each with a fresh optimiser and
    scheduler, under ``output_dir/stage-<name>/``.

    - ``rows``: which rows of the (prepared, tokenized) training data the stage trains on, a predicate over a row
      (e.g. ``lambda row: row["stage"] == 2``); ``None``: all of them.
    - ``refresh_reference``: before the stage starts, the reference becomes a frozen copy of the current policy
      (π_ref ← π_θ): a full copy, a frozen ``ref`` adapter, or recomputed precomputed columns, as the run's
      reference mode says. A hard copy at the boundary, not TRL's ``sync_ref_model`` (soft mixing every N steps).
    """

    name: str
    rows: Callable[[dict[str, Any]], bool] | None = None
    refresh_reference: bool = False


@dataclass(frozen=True)
class TopK:
    """A frozen source's output kind (see ``Needs.teachers``): per scored token, the ``k`` most likely next-token ids
    and their full-softmax log-probs (``FrozenOutputs.topk_ids`` / ``topk_logps``, ``[K, B, T, k]``)."""

    k: int = 50


#: An output a frozen source gives (``Needs.teachers``): ``"logps"`` (label log-probs, ``[K, B, T]``), ``"logits"``
#: (full logits at the scored positions only, ``[M, V]``), ``"hidden_states"`` (last layer, ``[K, B, T, H]``) or a
#: :class:`TopK`.
Output = Any


@dataclass
class FrozenOutputs:
    """A frozen model's outputs on the policy's own sequences (no grad), aligned with ``ctx.token_logps``; only what
    the method asked for (``Needs.teachers``) is filled.

    - ``logps`` ``[K, B, T]``: log-probs of the labels (zero off the scored tokens).
    - ``topk_ids`` / ``topk_logps`` ``[K, B, T, k]``: per scored token the ``k`` most likely next tokens and their
      log-probs under the full softmax (ids ``-1`` and log-probs ``0`` off the scored tokens).
    - ``logits`` ``[M, V]``: the full next-token logits at the ``M`` scored positions only, in the order of
      :meth:`LossContext.scored` (``[K, B, T, V]`` for the whole sequence is never built).
    - ``hidden_states`` ``[K, B, T, H]``: the last layer's hidden states at the label positions.
    """

    logps: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def output_kinds(spec: Output | tuple[Output, ...]) -> tuple[Output, ...]:
    """A ``Needs.teachers`` value as a tuple of output kinds (checked: ``logps``, ``logits``, ``hidden_states`` or a
    :class:`TopK`)."""
    kinds = spec if isinstance(spec, tuple) else (spec,)
    for kind in kinds:
        if not (isinstance(kind, TopK) or kind in ("logps", "logits", "hidden_states")):
            raise ValueError(f"unknown frozen output {kind!r}: use 'logps', 'logits', 'hidden_states' or TopK(k)")
    return kinds


@dataclass(frozen=True)
class Rollout:
    """What an online method samples (``Needs.rollout``; the recipe's ``rollout:`` block may override each field).

    - ``n``: completions per prompt and source.
    - ``sources``: where they come from, in order: ``"policy"`` (the current policy), ``"reference"`` (the frozen
      reference: the policy with its adapter off, or the reference model), ``"column:<name>"`` (a data column's
      text, e.g. a gold answer, taken as one completion).
    - ``when``: ``"step"`` (fresh samples before every optimisation step) or ``"iteration"`` (samples of a whole
      iteration's prompts, then training on the rows they make: the recipe's ``iterations:`` block, SELM, DNO).
    - ``decoding``: ``transformers.GenerationConfig`` fields (``max_new_tokens``, ``temperature``, ``top_p``,
      ``top_k``, ``do_sample``...).
    - ``missing_eos_penalty``: subtracted from the reward of every sample that ends without EOS (TRL's
      ``missing_eos_penalty``; ``None``: off), applied by the stage before any method sees the samples.
    - ``environment``: an :class:`Environment` (built from the recipe's ``rollout.environment``) that turns each
      sample into a multi-turn episode (group methods; ``decoding.max_new_tokens`` is then per turn); ``None``: one
      completion per sample.
    - ``every``: diffusion methods sample fresh images every ``every`` optimizer steps (the steps between train on
      the last rows again); text methods sample before every step.

    A diffusion method's ``decoding`` holds its sampler's settings instead (``steps``, ``eta``, ``guidance``: see
    :func:`trl_plus.diffusion.sampling.check_sampling`).
    """

    n: int = 2
    sources: tuple[str, ...] = ("policy",)
    when: Literal["step", "iteration"] = "step"
    decoding: Mapping[str, Any] = field(default_factory=lambda: {"max_new_tokens": 64, "temperature": 0.9})
    missing_eos_penalty: float | None = None
    environment: Environment | None = None
    every: int = 1

    def updated(self, fields: Mapping[str, Any]) -> Rollout:
        """This rollout with the recipe's ``rollout:`` fields (``decoding`` merged over this one's)."""
        import dataclasses

        fields = dict(fields)
        if "decoding" in fields:
            fields["decoding"] = {**self.decoding, **fields["decoding"]}
        if "sources" in fields:
            fields["sources"] = tuple(fields["sources"])
        return dataclasses.replace(self, **fields)


#: The ``decoding`` keys the stage sets itself (a recipe may not).
OWN_DECODING_KEYS = ("eos_token_id", "pad_token_id", "num_return_sequences", "return_dict_in_generate")

#: Ranges transformers does not check itself (it samples with a negative temperature or a top_p of 2 silently).
DECODING_RANGES = {"temperature": (0.0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "top_k": (-1, None),
                   "max_new_tokens": (0, None), "num_beams": (0, None), "repetition_penalty": (0.0, None)}  # fmt: skip


def check_decoding(decoding: Mapping[str, Any], where: str = "rollout.decoding") -> None:
    """One line for a decoding setting trl-plus owns, one ``transformers.GenerationConfig`` does not know (with
    the nearest names), or a value out of range (``temperature`` > 0, 0 < ``top_p`` ≤ 1, ...)."""
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict())
    for key, value in decoding.items():
        if key in OWN_DECODING_KEYS:
            raise TrlPlusError(f"{where}.{key}: set by trl-plus itself; remove it")
        if key not in known:
            raise TrlPlusError(f"{where}.{key}: not a generation setting{did_you_mean(key, known)}")
        low, high = DECODING_RANGES.get(key, (None, None))
        if low is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low or (
                high is not None and value > high):  # fmt: skip
            bound = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
            raise TrlPlusError(f"{where}.{key}: expected a number {bound}, got {value!r}")


class GroupedSamples:
    """What text and image rollouts share: rows grouped by prompt (``group`` ``[N]``), scored (``scores`` ``[N, S]``,
    ``weights`` ``[S]``)."""

    group: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor

    def reward(self) -> torch.Tensor:
        """``[N]`` the weighted sum of the scores, NaN outputs skipped (``nansum``; all NaN → 0)."""
        return (self.scores * self.weights).nansum(-1)

    @property
    def num_groups(self) -> int:
        """``Q``: prompts in the stage."""
        return int(self.group.max().item()) + 1 if len(self.group) else 0

    def rows_of(self, g: int) -> list[int]:
        """The row indices of prompt ``g``, in sampling order."""
        return (self.group == g).nonzero().flatten().tolist()

    def best_and_worst(self, g: int) -> tuple[int, int]:
        """The rows of prompt ``g`` with the highest and the lowest :meth:`reward` (ties: the earlier sample; the
        same row when all tie)."""
        members = self.rows_of(g)
        values = self.reward()[members]
        return members[int(values.argmax())], members[int(values.argmin())]


@dataclass
class Rollouts(GroupedSamples):
    """The samples of one rollout stage, group-major (prompt ``g``'s rows are contiguous), as every online hook
    sees them. Token ids are the sampled ones (never re-tokenized text).

    - ``prompt_ids`` / ``completion_ids``: per row (a completion ends with EOS when ``eos`` is true);
    - ``prompts`` / ``completions``: text (or chat messages), for scorers;
    - ``group`` ``[N]``: the row's prompt (0 .. Q−1, in the batch's order); ``source``: per row, the
      :attr:`Rollout.sources` entry it came from;
    - ``scores`` ``[N, S]``: every scorer output (NaN: not applicable), ``weights`` ``[S]`` the recipe's weights;
    - ``eos`` ``[N]`` bool, ``lengths`` ``[N]`` completion tokens;
    - ``columns``: the prompts' other data columns, repeated per row;
    - ``old_token_logps`` ``[N, T]``: the sampling policy's per-token log-probs (right-padded), where a group
      method ``wants_old_logps``;
    - ``turn_ids`` ``[N, T]`` (long): in a multi-turn episode (``Rollout.environment``), the turn (0, 1, ...) of each
      completion token the policy wrote, −1 on the environment's observation tokens and past the end; ``None``
      for single-turn rollouts. The episodes' records (:meth:`Environment.outcome`) are ``columns["episode"]``.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    prompts: list[Any]
    completions: list[Any]
    group: torch.Tensor
    source: list[str]
    scores: torch.Tensor
    weights: torch.Tensor
    eos: torch.Tensor
    lengths: torch.Tensor
    columns: Mapping[str, list] = field(default_factory=dict)
    score_names: tuple[str, ...] = ()
    old_token_logps: torch.Tensor | None = None
    turn_ids: torch.Tensor | None = None

    def penalize_missing_eos(self, penalty: float | None) -> Rollouts:
        """These rollouts with ``penalty`` subtracted from the :meth:`reward` of every completion without EOS (TRL's
        ``missing_eos_penalty``): one more score column, ``missing_eos`` (1 where EOS is missing), weighted
        ``−penalty``. ``None``: these rollouts, unchanged."""
        import dataclasses

        import torch

        if penalty is None:
            return self
        missing = (~self.eos).to(self.scores.dtype).unsqueeze(-1)
        return dataclasses.replace(
            self, scores=torch.cat([self.scores, missing], -1), score_names=(*self.score_names, "missing_eos"),
            weights=torch.cat([self.weights, self.weights.new_tensor([-penalty])]))  # fmt: skip


@dataclass
class IterationContext:
    """One iteration of an iterated online run (the recipe's ``iterations:`` block), as
    :meth:`Method.refresh` sees it.

    - ``index`` (0-based) of ``count`` iterations; ``trainer``: the run's trainer, holding the current policy;
    - ``prompts``: this iteration's prompt rows, ``{"prompt_ids", "prompt", "columns"}`` (the rows the prompt
      collator makes), this process's share of them;
    - ``history``: the rows earlier iterations built, oldest first (what replay draws from).
    """

    index: int
    count: int
    trainer: Any
    prompts: list[dict[str, Any]]
    history: list[list[dict[str, Any]]] = field(default_factory=list)
    batch_size: int = 8
    progress: Callable[[int], None] | None = None  # told how many prompts each sample() call sampled

    def sample(self, prompts: list[dict[str, Any]]) -> Rollouts:
        """The trainer's rollout stage on ``prompts``: samples from the rollout's sources, scored."""
        rollouts = self.trainer.rollout_stage(prompts)
        if self.progress is not None:
            self.progress(len(prompts))
        return rollouts

    def log(self, name: str, value: Any) -> None:
        """Log ``value`` as ``name`` with the iteration's first training step (averaged over processes: call it on
        every process), e.g. a method's own generation-side figure."""
        self.trainer.log_metric(name, value)

    def batches(self) -> list[list[dict[str, Any]]]:
        """This iteration's prompts in generation batches of ``batch_size``."""
        return [self.prompts[i : i + self.batch_size] for i in range(0, len(self.prompts), self.batch_size)]


@dataclass(frozen=True)
class Needs:
    """What a method needs from the trainer. The trainer builds exactly this and nothing more.

    - ``reference``: ``"yes"`` (a frozen reference is required), ``"no"`` (never computed: no forward pass,
      no weights in memory) or ``"optional"`` (used when the recipe's ``reference.mode`` provides one).
    - ``teacher``: a frozen teacher model (recipe block ``teacher:``); what the teacher hook returns reaches the loss
      as ``ctx.teacher`` (default: its ``[K, B, T]`` label log-probs).
    - ``teachers``: named frozen sources and what each gives, e.g. ``{"guide": "logps"}`` or
      ``{"dpo": "logits", "rev": "logits"}`` or ``{"teacher": TopK(50)}`` (see :data:`Output`); each is a recipe
      block ``teachers.<name>`` (a separate model, a frozen adapter on the policy's base, or precomputed columns)
      and reaches the loss as ``ctx.frozen[name]``, a :class:`FrozenOutputs`.
    - ``scored_logits``: the loss may call :meth:`LossContext.logps_at` and :meth:`LossContext.scored_logits` (the
      policy's full-softmax log-probs at given ids, its logits at the scored positions), computed from the final
      hidden states in chunks, with grad; the default fused head never builds ``[K*B, L, V]`` logits.
    - ``rollout``: an online method's :class:`Rollout` — the trainer samples completions of the batch's prompts
      (from the policy, the reference or a data column), scores them with the recipe's ``rollout.scorers`` and
      builds the training rows with :meth:`Method.make_examples` before each step; the data are prompts only.
    - ``fields``: data columns required beyond ``prompt``/``chosen``/``rejected`` (e.g. ``("margin",)``);
      they are collated into ``ctx.batch[name]``.
    - ``optional_fields``: data columns used when the data has them (e.g. behaviour-policy log-probs); collated
      into ``ctx.batch[name]`` when every example of the batch has the column, absent from ``ctx.batch`` otherwise.
    - ``logits`` / ``hidden_states``: ask for the full logits or hidden states in ``ctx.outputs`` (costs memory:
      the default fused head never materialises the logits).
    - ``precomputable_reference``: ``False`` when the collated sequences change from step to step (random
      perturbations): reference log-probs computed once before training could not match them, so
      ``reference.mode: precomputed`` is refused.
    - ``list_fields``: ragged per-example list columns (scores, ranks, relevance), each a name or a
      :class:`ListField`; collated into ``ctx.batch[name]`` ``[B, L]`` (padded, ``L`` = the batch's longest list)
      and ``ctx.batch[name + "_mask"]`` ``[B, L]`` (``True`` on real entries). A required list column is also a
      column the data must have; every row is checked (type, length) before any model loads.
    - ``token_fields``: token-aligned columns that the method's own collator emits (``Sequence.tokens``, e.g.
      IRPO's per-token item ids); the trainer applies the label shift and hands them to the loss as
      ``ctx.tokens[name]``, ``[K, B, T]`` aligned with ``ctx.token_logps``.
    - ``policy_adapters``: named trainable LoRA adapters (recipe ``model.adapters``) the loss reads one by one:
      the trainer runs one policy forward per name and step, each under that adapter (``requires_grad`` left as it
      is, so every adapter gets its gradient), and the loss reads ``ctx.for_adapter(name)``; ``ctx.token_logps``
      is the first name's. The reference (every adapter off) runs once. ``()``: the one policy adapter, if any.
    """

    reference: Literal["yes", "no", "optional"] = "yes"
    teacher: bool = False
    teachers: Mapping[str, Output | tuple[Output, ...]] = field(default_factory=dict)
    scored_logits: bool = False
    rollout: Rollout | None = None
    fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    logits: bool = False
    hidden_states: bool = False
    precomputable_reference: bool = True
    list_fields: tuple[str | ListField, ...] = ()
    token_fields: tuple[str, ...] = ()
    policy_adapters: tuple[str, ...] = ()

    @property
    def lists(self) -> tuple[ListField, ...]:
        """``list_fields`` as :class:`ListField` objects."""
        return tuple(f if isinstance(f, ListField) else ListField(f) for f in self.list_fields)

    def frozen_sources(self) -> dict[str, tuple[Output, ...]]:
        """``teachers`` with each value a tuple of output kinds (checked)."""
        return {name: output_kinds(spec) for name, spec in self.teachers.items()}

    def describe(self) -> str:
        """A short human-readable summary, as shown by ``trl-plus list``."""
        parts = {"yes": ["reference"], "optional": ["reference (optional)"], "no": ["reference-free"]}[self.reference]
        parts += ["teacher"] if self.teacher else []
        if self.rollout is not None:
            parts.append(f"rollout ({self.rollout.n} × {', '.join(self.rollout.sources)}, per {self.rollout.when})")
        for name, kinds in self.frozen_sources().items():
            shown = ", ".join(f"top-{kind.k}" if isinstance(kind, TopK) else kind for kind in kinds)
            parts.append(f"teacher ({shown})" if name == "teacher" else f"teacher {name} ({shown})")
        if self.fields:
            parts.append("fields " + ", ".join(self.fields))
        if self.optional_fields:
            parts.append("optional fields " + ", ".join(self.optional_fields))
        if self.list_fields:
            parts.append("lists " + ", ".join(f.name + ("" if f.required else "?") for f in self.lists))
        if self.policy_adapters:
            parts.append("adapters " + ", ".join(self.policy_adapters))
        return ", ".join(parts) or "-"


@dataclass
class LossContext:
    """Everything the trainer computed for one batch, handed to :meth:`Method.loss`.

    The batch holds ``K = num_sequences`` sequences per example and ``B`` examples; per-token tensors are shaped
    ``[K, B, T]`` (index 0 = the preferred sequence, 1 = the dispreferred one for pairwise methods), where ``T``
    runs over the positions of the *shifted* labels (token ``t+1`` predicted from ``t``). Log-probs are zero
    where ``mask`` is zero. A non-text scorer (a diffusion model's negative denoising error, say) fills
    ``token_logps`` with shape ``[K, B, 1]`` and a mask of ones, so every helper below keeps working.
    """

    token_logps: torch.Tensor  # [K, B, T] policy per-token log-probs (with grad)
    mask: torch.Tensor  # [K, B, T] 1.0 on scored (completion) tokens
    ref_token_logps: torch.Tensor | None = None  # [K, B, T] reference per-token log-probs (no grad), if any
    teacher: Any = None  # whatever the teacher hook returned (default: [K, B, T] teacher log-probs)
    batch: Mapping[str, Any] = field(default_factory=dict)  # the collated batch: extra per-example fields
    outputs: Any = None  # the policy forward's outputs (logits / hidden_states when the method asks)
    step: int = 0  # global optimisation step
    epoch: float = 0.0  # training epochs done (fractional, TRL's ``state.epoch``): per-epoch schedules index it
    training: bool = True
    seq_mask: torch.Tensor | None = None  # [K, B] 1.0 where example b has a k-th sequence (variable K); None: all
    tokens: Mapping[str, torch.Tensor] = field(default_factory=dict)  # Needs.token_fields, [K, B, T] each
    frozen: Mapping[str, FrozenOutputs] = field(default_factory=dict)  # Needs.teachers by name (no grad)
    labels: torch.Tensor | None = None  # [K, B, T] the label token ids (token t+1 at position t; -1 off real rows)
    head: Any = None  # Needs.scored_logits: the policy's LM head on its final hidden states (set by the trainer)
    #: Needs.policy_adapters: adapter name -> its LossContext, a mapping (tests) or a function ``(ctx, name)`` the
    #: trainer sets
    adapters: Any = None

    def for_adapter(self, name: str) -> LossContext:
        """The same batch with the policy's trainable adapter ``name`` active (``Needs.policy_adapters``): its own
        ``token_logps`` / ``outputs`` (with grad), the reference, frozen sources and batch shared with this context.
        Computed once per name, when first asked for."""
        if self.adapters is None:
            raise RuntimeError("this loss reads named adapters: set Needs(policy_adapters=(...)) on the method")
        if isinstance(self.adapters, Mapping):
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r} in this context (it has: {', '.join(self.adapters)})")
            return self.adapters[name]
        cache = self.__dict__.setdefault("_adapter_contexts", {})
        if name not in cache:
            other = self.adapters(self, name)
            if other is self:  # (no reference cycle: the graph is freed with the context)
                return self
            cache[name] = other
        return cache[name]

    def scored(self, values: torch.Tensor) -> torch.Tensor:
        """``[K, B, T, ...] -> [M, ...]``: the values at the ``M`` scored tokens (``mask`` 1), in one fixed order
        (the order of ``FrozenOutputs.logits`` and :meth:`scored_logits`)."""
        return values[self.mask.bool()]

    def unscored(self, values: torch.Tensor) -> torch.Tensor:
        """``[M, ...] -> [K, B, T, ...]``: per-scored-token values back on the grid (zeros elsewhere; differentiable),
        the inverse of :meth:`scored`."""
        where = self.mask.bool()
        out = values.new_zeros((*where.shape, *values.shape[1:]))
        out[where] = values
        return out

    def scored_logits(self) -> torch.Tensor:
        """``[M, V]`` the policy's next-token logits at the scored positions (with grad; ``Needs.scored_logits``).
        Costs ``M x V`` activations: for log-probs at a few ids use :meth:`logps_at`."""
        return self._head().logits(self.mask.bool())

    def logps_at(self, ids: torch.Tensor) -> torch.Tensor:
        """``[K, B, T, k]`` the policy's full-softmax log-probs of the token ``ids`` ``[K, B, T, k]`` (with grad;
        ``Needs.scored_logits``), zero off the scored tokens. Computed in chunks of scored positions whose logits are
        recomputed in the backward pass, so memory holds one chunk of ``V`` logits, not ``[M, V]``."""
        where = self.mask.bool()
        return self.unscored(self._head().logps_at(where, ids[where].clamp(min=0)))

    def _head(self) -> Any:
        if self.head is None:
            raise RuntimeError("this loss reads the policy's logits: set Needs(scored_logits=True) on the method")
        return self.head

    @property
    def sequence_mask(self) -> torch.Tensor:
        """``[K, B]``: 1.0 where sequence ``k`` of example ``b`` exists (all ones unless the batch has variable K);
        the log-probs and masks of a missing sequence are all zero."""
        if self.seq_mask is not None:
            return self.seq_mask
        return self.token_logps.new_ones(self.token_logps.shape[:2])

    def pool(self, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
             reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """``[K, B, T] -> [K, B, S]``: ``values`` pooled over the scored tokens of each segment.

        ``segment_ids`` ``[K, B, T]`` gives each token's segment ``0 .. num_segments-1`` (``-1``: none); only tokens
        with ``mask`` 1 count. A segment without tokens (cut by ``max_length``, or absent) gets 0: see
        :meth:`segment_mask`. ``reduce="mean"`` divides by the segment's token count.
        """
        values, counts = self._segment_sums(values, segment_ids, num_segments)
        return values if reduce == "sum" else values / counts.clamp(min=1)

    def _segment_sums(self, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int):
        """``[K, B, S]`` sums of ``values`` and counts of scored tokens per segment (one scatter over the tokens;
        ids outside ``0 .. S-1`` and unscored tokens go to a spare slot that is dropped)."""
        import torch

        scored = self.mask.bool() & (segment_ids >= 0) & (segment_ids < num_segments)
        slots = torch.where(scored, segment_ids.long(), num_segments)
        shape = (*slots.shape[:-1], num_segments + 1)
        sums = values.new_zeros(shape).scatter_add(-1, slots, values * scored)
        counts = values.new_zeros(shape).scatter_add(-1, slots, scored.to(values.dtype))
        return sums[..., :num_segments], counts[..., :num_segments]

    def segment_mask(self, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
        """``[K, B, S]`` bool: segments with at least one scored token."""
        return self._segment_sums(self.mask, segment_ids, num_segments)[1] > 0

    @property
    def num_sequences(self) -> int:
        """``K``: sequences per example (2 for chosen/rejected)."""
        return self.token_logps.shape[0]

    @property
    def batch_size(self) -> int:
        """``B``: examples in the batch."""
        return self.token_logps.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """``[K, B]`` number of scored tokens per sequence (as a float tensor)."""
        return self.mask.sum(-1)

    def logps(self) -> torch.Tensor:
        """``[K, B]`` policy sequence log-probs: the sum over scored tokens."""
        return (self.token_logps * self.mask).sum(-1)

    def ref_logps(self) -> torch.Tensor:
        """``[K, B]`` reference sequence log-probs; an error if no reference was computed."""
        if self.ref_token_logps is None:
            raise RuntimeError("this method asked for reference log-probs but the run has no reference model")
        return (self.ref_token_logps * self.mask).sum(-1)

    def mean_logps(self) -> torch.Tensor:
        """``[K, B]`` policy log-probs averaged over each sequence's scored tokens."""
        return self.logps() / self.lengths.clamp(min=1)


@dataclass
class PolicyOutputs:
    """What :meth:`Method.policy_forward` returns: the policy's per-token label log-probs ``[K*B, T]`` (or one row per
    real sequence of a variable-K batch), with grad, on the shifted labels (zero off the scored tokens is not
    required: the trainer masks), and whatever the loss reads as ``ctx.outputs``."""

    token_logps: torch.Tensor
    outputs: Any = None


@dataclass
class LossOutput:
    """What a loss returns.

    - ``loss``: the scalar to minimise (already reduced over the batch).
    - ``rewards``: optional ``[K, B]`` detached implicit rewards; rows 0 and 1 are logged as ``rewards/chosen``,
      ``rewards/rejected``, ``rewards/margins`` and ``rewards/accuracies``, like TRL's DPOTrainer.
    - ``metrics``: further named scalars (floats or 0-d tensors), logged next to TRL's.
    """

    loss: torch.Tensor
    rewards: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Configured:
    """What a method, a metric and a scorer share: built from a validated ``Config`` (a :class:`MethodConfig`), or a
    mapping of its fields, or keyword arguments."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | Mapping[str, Any] | None = None, **kwargs: Any):
        if config is None or isinstance(config, Mapping):
            config = self.Config(**{**(config or {}), **kwargs})
        elif kwargs:
            raise TypeError("pass either a config object or keyword arguments, not both")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


#: The survey taxonomy's vocabulary ("A Survey of Direct Preference Optimization", arXiv 2503.11701): the keys a
#: :attr:`Method.taxonomy` may use and each key's values (``trl-plus list --by KEY`` groups by them). An empty tuple
#: is an explicit "none" (the card's "—"). ``source`` says whether the survey's repository places the method's paper
#: (``survey``) or not (``inferred``: every tag is ours); ``survey`` lists the leaf sections it is placed in, named by
#: the tag each one implies (``"length-bias"``: Length Bias; ``"offline"``: Offline Learning; ``"basic"``: the
#: survey's Basic list), so a method's survey-placed tags are the ones ``survey`` names and the rest are inferred.
TAXONOMY: Mapping[str, tuple[str, ...]] = {
    "data.quality": ("heterogeneity", "distinguishability", "noise"),
    "data.feedback": ("point", "pair", "list"),
    "data.granularity": ("token", "step", "sentence", "turn"),
    "learning.paradigm": ("offline", "online", "active"),
    "learning.objective": ("multi-objective", "self-play"),
    "constraint.reference": ("fixed", "reference-free", "dynamic-reference"),
    "constraint.divergence": ("diversity", "generalization"),
    "constraint.safety": ("safety",),
    "property": ("distribution-shift", "length-bias", "likelihood-collapse", "alignment-tax", "other-analysis"),
    "scope": ("text", "image", "video", "3d", "policy", "agent", "image+text"),
    "source": ("survey", "inferred"),
    "survey": ("basic", "heterogeneity", "distinguishability", "noise", "point", "pair", "list", "token", "step",
               "sentence", "turn", "offline", "online", "active", "multi-objective", "self-play", "reference-free",
               "dynamic-reference", "diversity", "generalization", "safety", "distribution-shift", "length-bias",
               "likelihood-collapse", "alignment-tax", "other-analysis"),
}


class Method(Configured):
    """A preference-optimization method: subclass it, set the class attributes, implement :meth:`loss`.

    Class attributes:
        name: the registry name used in recipes (``method: name``).
        family: e.g. ``"offline-pairwise"`` (free text, for display).
        trainer: the trainer kind that runs the method (``"preference"``: :class:`trl_plus.PlusTrainer`); the
            application maps kinds to trainer classes, so a new kind never needs a branch over methods.
        paper: a :class:`Paper`.
        summary: one line on what the method does.
        needs: a :class:`Needs`.
        Config: a :class:`MethodConfig` subclass with the paper's defaults.
        data_fields: the dataset columns a user must provide (``needs.fields`` are added to them).
        sequences_per_example: ``K``, the number of sequences the collator builds per example; ``None`` when it
            varies (a collator that builds fewer for some examples emits ``seq_mask``; see
            :class:`trl_plus.SequencesCollator`). An instance may set it from its config (K as a hyperparameter).
        example_data: the ``data.train`` block of the example recipe shown by ``trl-plus show``.

    Hooks a method may override (all have working defaults for pairwise text):
        :meth:`prepare_data`, :meth:`stages`, :meth:`tokenize`, :meth:`collator`, :meth:`reference`,
        :meth:`teacher`; on the trained side :meth:`prepare_model` (with ``trainable_modules``),
        :meth:`policy_forward`, :meth:`sampler` and :meth:`generation_model`.
    """

    name: ClassVar[str]
    family: ClassVar[str] = "offline-pairwise"
    trainer: ClassVar[str] = "preference"
    paper: ClassVar[Paper]
    summary: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    data_fields: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    sequences_per_example: int | None = 2
    #: The ``data.train`` block of the example recipe ``trl-plus show`` prints (must run from the repository root).
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/quickstart_prefs.jsonl"}
    #: The run's tokenizer, set by the trainer before it calls :meth:`collator` (vocabulary size, special ids).
    tokenizer: Any = None
    #: Names of modules :meth:`prepare_model` adds that train with the policy: with LoRA they are appended to
    #: ``modules_to_save`` (trained, and saved with the adapter); without, they are ordinary trainable weights.
    trainable_modules: ClassVar[tuple[str, ...]] = ()

    #: Survey-taxonomy tags, ``{key: value or (values, ...)}`` with keys and values from :data:`TAXONOMY`
    #: (``trl-plus list --by KEY``), e.g. ``{"constraint.reference": "reference-free", "property": "length-bias",
    #: "survey": ("reference-free", "length-bias"), "source": "survey"}``; ``()`` is an explicit "none". Each method
    #: class sets its own (a subclass would inherit its parent's; the dpo-survey plugin's meta-test requires its own).
    taxonomy: ClassVar[Mapping[str, str | tuple[str, ...]]] = {}

    # -- identity -------------------------------------------------------------------------------------------
    @classmethod
    def required_columns(cls) -> tuple[str, ...]:
        """Every column a training file must have for this method."""
        lists = tuple(f.name for f in cls.needs.lists if f.required)
        return tuple(dict.fromkeys(cls.data_fields + cls.needs.fields + lists))

    # -- data -----------------------------------------------------------------------------------------------
    def prepare_data(self, dataset: Any, split: str) -> Any:
        """Raw rows in, training rows out, before tokenizing (``split`` is ``"train"`` or ``"eval"``); may change the
        row count (a ranked list -> pairs). The default returns ``dataset`` unchanged.

        ``dataset`` is a ``datasets.Dataset`` that has every column of :meth:`required_columns` (checked before).
        The result must have what the method's tokenization reads. The trainer applies it to a dataset that still
        has the raw columns, so it must either remove one of them or be idempotent. Raise
        :class:`trl_plus.TrlPlusError` for bad rows, naming the column and the fix.
        """
        return dataset

    def stages(self, dataset: Any) -> list[Stage] | None:
        """The training stages, in order, for the prepared and tokenized training ``dataset``; ``None`` (the
        default): one stage over all rows. See :class:`Stage`."""
        return None

    #: When ``None`` (the default) the trainer tokenizes pairs exactly as TRL's DPOTrainer does: prompt
    #: extraction, EOS appended, columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``. A method with another
    #: data shape sets ``tokenize`` to a function ``(example: dict, tokenizer) -> dict`` of new columns.
    tokenize: ClassVar[Callable[..., dict] | None] = None

    #: Columns produced by ``tokenize`` that the collator reads (kept when TRL prunes unused columns).
    tokenized_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "chosen_ids", "rejected_ids")

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start") -> Callable | None:
        """Return the data collator (``list[example] -> batch``), or ``None`` (the default) for the core's.

        The batch must hold ``input_ids``, ``attention_mask`` and ``completion_mask`` shaped ``[K*B, L]`` and
        ordered sequence-major (``[seq0_ex1..seq0_exB, seq1_ex1..]``), plus any extra per-example fields. The
        core's default is TRL's pairwise collator with ``needs.fields`` (and the ``needs.optional_fields`` the data
        has) stacked as tensors (:class:`trl_plus.PairwiseCollator`); :class:`trl_plus.SequencesCollator` builds
        any other shape from per-example ``(ids, score mask)`` lists.
        """
        return None

    def make_examples(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """An online method's training rows from one rollout stage (``Needs.rollout``): dicts the method's collator
        reads (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` for the core's pairwise collator, plus any
        ``needs.fields``). Default: per prompt, the highest-reward sample is chosen and the lowest rejected, ties to
        the first sample (TRL's ``OnlineDPOTrainer`` rule); a prompt with one sample gives no row."""
        rows = []
        for g in range(rollouts.num_groups):
            members = rollouts.rows_of(g)
            if len(members) < 2:
                continue
            best, worst = rollouts.best_and_worst(g)  # the first maximum / minimum: ties to the earlier sample
            if worst == best:  # all tied: the first is chosen, the last rejected
                worst = members[-1]
            rows.append({"prompt_ids": rollouts.prompt_ids[best], "chosen_ids": rollouts.completion_ids[best],
                         "rejected_ids": rollouts.completion_ids[worst]})  # fmt: skip
        return rows

    def refresh(self, it: IterationContext) -> list[dict[str, Any]]:
        """An iterated run's training rows for iteration ``it.index`` (``rollout.when == "iteration"``), built with
        the current policy before the iteration trains. Default: sample every prompt of the iteration (in batches,
        the rollout stage: sources, scorers) and :meth:`make_examples` of each batch. The driver adds the replayed
        rows of earlier iterations (``iterations.replay``) itself."""
        rows: list[dict[str, Any]] = []
        for batch in it.batches():
            rows += self.make_examples(it.sample(batch))
        return rows

    # -- frozen models -------------------------------------------------------------------------------------
    def reference(self, trainer: Any, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Reference hook: return ``[K*B, T]`` reference per-token log-probs, or ``None`` to use the core's.

        The core's default follows ``reference.mode``: the PEFT adapter switched off, a separate frozen model,
        or values precomputed once before training.
        """
        return None

    def teacher(self, trainer: Any, inputs: Mapping[str, Any]) -> Any:
        """Teacher hook: what reaches the loss as ``ctx.teacher``; ``None`` uses the core's default.

        The default runs ``trainer.teacher_model`` without gradients on the same sequences and returns its
        ``[K, B, T]`` per-token log-probs. Override it to return e.g. top-k distributions
        (``trainer.forward_logits(trainer.teacher_model, inputs)`` gives full logits).
        """
        return None

    # -- the trained side -----------------------------------------------------------------------------------
    def prepare_model(self, model: Any) -> Any:
        """Change the policy before LoRA wraps it (add modules: extra LM heads, say) and return it; ``None`` (the
        default) leaves it as it is. Called once by the trainer, and again by ``trl-plus generate`` before a run's
        weights are loaded, so it must build the same modules from the same model (deterministically). The
        reference keeps the model's own modules: a frozen copy is taken before this hook, and the adapter-off
        reference never runs what the policy forward alone reads."""
        return None

    def policy_forward(self, trainer: Any, model: Any, inputs: Mapping[str, Any]) -> PolicyOutputs | None:
        """The policy's per-token log-probs for the batch (with grad), e.g. through an extra head per example; ``None``
        (the default) uses the core's forward (TRL's fused LM head). ``trainer`` gives ``trainer.policy_hidden(model,
        inputs)`` (the final hidden states, one forward), ``trainer.head_logps(hidden, weight, inputs, rows)`` (label
        log-probs under a linear head, in checkpointed chunks: memory holds one chunk of logits) and
        ``trainer.policy_module(model, name)`` (a module :meth:`prepare_model` added, as the active adapter trains
        it). Called once per named adapter (``Needs.policy_adapters``), under that adapter."""
        return None

    def sampler(self, dataset: Any, batch_size: int, generator: Any) -> Any:
        """The training sampler: an iterable of row indices of the tokenized ``dataset`` that the data loader cuts
        into batches of ``batch_size`` (per device) in order, e.g. batches balanced over a column; ``generator`` is
        the run's seeded ``torch.Generator``. ``None`` (the default): the trainer's own (shuffled)."""
        return None

    def generation_model(self, model: Any, weights: list[float] | None) -> Any:
        """The model ``trl-plus generate`` samples from, given the run's loaded policy and ``--weights``; ``None``
        (the default) generates with ``model`` as loaded (and refuses ``--weights``)."""
        return None

    # -- the objective --------------------------------------------------------------------------------------
    def loss(self, ctx: LossContext) -> LossOutput:
        """The objective: a pure function of ``ctx`` returning a :class:`LossOutput`."""
        raise NotImplementedError(f"method {self.name!r} does not implement loss()")


class Metric(Configured):
    """A measurement of a model on preference data: loss-shaped, over no-grad :class:`LossContext` s.

    The trainer builds each batch's context exactly as for a loss (``PlusTrainer.build_context``), with what
    ``needs`` asks for (reference log-probs, frozen sources such as ``teachers={"reference": "logits"}``, the policy's
    ``scored_logits``, ``hidden_states``), from the pairs of the data (the core's pairwise collation: ``K = 2``,
    index 0 the chosen completion), in eval mode and without gradients. So a metric logged during training
    (recipe ``metrics:``, logged as ``eval_<metric>/<key>``) equals the same metric on the saved checkpoint
    (``trl-plus eval RUN --metric NAME``).

    Class attributes: ``name``, ``summary`` (one line), ``paper`` (a :class:`Paper` or ``None``), ``needs``,
    ``Config``, ``data_fields`` (the columns the data must have; ``needs.fields`` are collated into ``ctx.batch``),
    ``split``: ``"eval"`` (the held-out sets, the default) or ``"train"`` (a property of the training data, measured
    before training, e.g. separability). At run time ``tokenizer`` is the run's tokenizer and ``data`` the rows
    evaluated (a ``datasets.Dataset``: row ``values["index"][i]`` is example ``i``'s).

    Override :meth:`batch`; :meth:`summarize` and :meth:`artefacts` have defaults.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    needs: ClassVar[Needs] = Needs(reference="optional")
    data_fields: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    split: ClassVar[Literal["eval", "train"]] = "eval"
    tokenizer: Any = None
    data: Any = None

    def batch(self, ctx: LossContext) -> Mapping[str, torch.Tensor]:
        """Per-example values of one batch: ``{key: tensor}`` with ``B = ctx.batch_size`` rows each (``[B]`` or
        ``[B, ...]``; a ragged per-token value may be a list of ``B`` tensors)."""
        raise NotImplementedError(f"metric {self.name!r} does not implement batch()")

    def summarize(self, values: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
        """The summary figures logged and printed, from every example's values (``values[key]`` is a list, one
        tensor per example, in data order; ``values["index"]`` the row indices). Default: the mean of each scalar
        value."""
        import torch

        return {key: torch.stack(rows).double().mean().item() for key, rows in values.items()
                if key != "index" and rows and all(r.dim() == 0 for r in rows)}  # fmt: skip

    def artefacts(self, values: Mapping[str, list[torch.Tensor]], out_dir: Any) -> list[Any]:
        """Files written into ``out_dir`` (a ``pathlib.Path`` that exists): CSV, HTML, PNG; returns their paths.
        Default: none."""
        return []


class Scorer(Configured):
    """A frozen text scorer: run once over data (``trl-plus score FILE --scorer NAME --out FILE`` writes its
    scores as columns; MODPO's margin rewards come from there), later the online trainers' rewards and judges.

    Class attributes: ``name``, ``summary``, ``Config``; ``kind`` (``"pointwise"``: one score per completion;
    pairwise and listwise judges come with the online trainers), ``outputs`` (the score names: more than one for a
    vector scorer), ``columns`` (data columns :meth:`score` reads, passed as keyword lists). ``tokenizer`` is the
    run's tokenizer (``--model``), ``device`` where to run.

    ``inputs`` says what a completion is: ``"text"`` (the default), or for image scorers of diffusion runs
    ``"pixels"`` (``completions`` is a float tensor ``[N, C, H, W]`` in [0, 1], decoded by the pipeline's VAE) or
    ``"latents"`` (``[N, ...]`` latents as the denoiser sees them; no decoding; a time-conditioned latent reward
    reads the ``sigma`` column ``[N]`` when it is given, and should be differentiable to guide a sampler).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    kind: ClassVar[Literal["pointwise", "pairwise", "listwise"]] = "pointwise"
    outputs: ClassVar[tuple[str, ...]] = ("score",)
    columns: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[Literal["text", "pixels", "latents"]] = "text"

    def __init__(self, config: MethodConfig | Mapping[str, Any] | None = None, *, tokenizer: Any = None,
                 device: Any = None, **kwargs: Any):  # fmt: skip
        super().__init__(config, **kwargs)
        self.tokenizer, self.device = tokenizer, device

    def score(self, prompts: list, completions: list, **columns: list) -> torch.Tensor:
        """``[N, len(outputs)]`` scores of ``completions[i]`` given ``prompts[i]`` (float; NaN where not
        applicable). ``prompts`` are strings or chat messages, like the data's."""
        raise NotImplementedError(f"scorer {self.name!r} does not implement score()")

    def compare(self, prompt: Any, candidates: list, **columns: list) -> torch.Tensor:
        """``[k]`` preference scores of ``candidates`` for one prompt (higher is better). Default, for a pointwise
        scorer: its first output."""
        return self.score([prompt] * len(candidates), candidates, **columns)[:, 0]

    def output_weights(self, weight: float | Sequence[float]) -> list[float]:
        """One weight per output: ``weight`` for each, or a list of them (one per output)."""
        if isinstance(weight, (int, float)):
            return [float(weight)] * len(self.outputs)
        if len(weight) != len(self.outputs):
            raise TrlPlusError(f"rollout.scorers: {len(weight)} weights for the {len(self.outputs)} outputs of "
                               f"{self.name} ({', '.join(self.outputs)})")  # fmt: skip
        return [float(w) for w in weight]

    def checked_scores(self, prompts: list, completions: list, **columns: list) -> torch.Tensor:
        """:meth:`score` as a float64 ``[N, len(outputs)]`` tensor (a 1-D result of a one-output scorer is a column),
        or a one-line error naming the scorer: one that raises, or returns another shape."""
        import torch

        try:
            value = self.score(prompts, completions, **columns)
        except Exception as exc:  # a scorer of a plugin: say which one failed, on how many rows
            raise TrlPlusError(f"rollout.scorers: {self.name} failed on {len(completions)} completions: "
                               f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.dim() == 1 and len(self.outputs) == 1:
            value = value.unsqueeze(-1)
        if tuple(value.shape) != (len(completions), len(self.outputs)):
            raise TrlPlusError(f"rollout.scorers: {self.name} returned shape {tuple(value.shape)} for "
                               f"{len(completions)} completions; expected ({len(completions)}, {len(self.outputs)})")
        return value

    def reward_funcs(self) -> list[Callable[..., list[float]]]:
        """TRL-compatible reward functions (``GRPOTrainer(reward_funcs=...)``), one per output, called as
        ``f(prompts=, completions=, **columns)`` and returning one float per completion; the outputs of one batch
        share one :meth:`score` call."""
        cache: dict[str, Any] = {}

        def scores(prompts: list, completions: list, **columns: Any) -> Any:
            key = (id(prompts), id(completions), len(completions))
            if cache.get("key") != key:
                wanted = {c: columns[c] for c in self.columns if c in columns}
                cache["key"], cache["value"] = key, self.checked_scores(list(prompts), list(completions), **wanted)
            return cache["value"]

        def make(j: int, output: str) -> Callable[..., list[float]]:
            def reward(prompts: list, completions: list, **columns: Any) -> list[float]:
                return [float(v) for v in scores(prompts, completions, **columns)[:, j]]

            reward.__name__ = f"{self.name}/{output}" if len(self.outputs) > 1 else self.name
            return reward

        return [make(j, output) for j, output in enumerate(self.outputs)]


class EnvironmentConfig(MethodConfig):
    """An environment's settings; every environment has ``max_turns`` (subclass this for more)."""

    max_turns: int = Field(4, ge=1, le=64, description="the episode ends after this many of the policy's turns")


class Environment(Configured):
    """A multi-turn text environment: a group method's rollout (``rollout.environment: {name: NAME, ...}``) becomes
    an episode — the policy writes a turn (up to ``decoding.max_new_tokens`` tokens, sampled as in any rollout),
    the environment answers with an observation, and so on until it ends the episode or ``max_turns`` is reached.

    The observations are tokens of the completion that the loss never sees (TRL's ``env_mask`` → ``tool_mask``);
    every token the policy wrote carries its turn in ``Rollouts.turn_ids`` / ``GroupContext.turn_ids``. The
    environment's record of each finished episode (:meth:`outcome`) reaches the scorers as the column
    ``episode`` (a scorer with ``columns = ("episode",)`` reads it: an environment's outcome is rewarded that way).

    One instance plays every episode of a run; the per-episode state is what :meth:`reset` returns. With a chat
    model (conversational prompts) an observation is a ``user`` message of the chat template; with text prompts
    its plain tokens.

    Class attributes: ``name``, ``summary``, ``Config`` (an :class:`EnvironmentConfig`), ``columns`` (the data
    columns :meth:`reset` reads).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = EnvironmentConfig
    columns: ClassVar[tuple[str, ...]] = ()

    def reset(self, prompt: Any, **columns: Any) -> Any:
        """A new episode's state for ``prompt`` (text or chat messages) and the row's ``columns``."""
        raise NotImplementedError(f"environment {self.name!r} does not implement reset()")

    def step(self, state: Any, action: str) -> str | None:
        """The observation after the policy's turn ``action`` (its decoded text), or ``None``: the episode is over.
        Called for every turn, the last one included (its observation is then dropped)."""
        raise NotImplementedError(f"environment {self.name!r} does not implement step()")

    def outcome(self, state: Any) -> dict[str, Any]:
        """The finished episode's record (JSON-like): the scorers' ``episode`` column. Default: empty."""
        return {}


@dataclass(frozen=True)
class ModelAlias:
    """A short model name a recipe may use as ``model.name_or_path`` (see ``register_model_aliases``)."""

    name: str
    description: str
    build: Callable[[Any], str]  # (cache_dir: pathlib.Path) -> local directory
    source: str = ""
