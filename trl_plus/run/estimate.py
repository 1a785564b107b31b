"""``trl-plus estimate RECIPE``: the peak accelerator memory of a recipe, predicted before any weight loads.

The model's shapes come from its config alone: the model is built on the meta device (no memory), so parameter
counts are exact. Each line of the breakdown states its rule; the constants are module-level names below.

- **base weights**: the recipe's ``model.dtype``; with ``quantization.load_in_4bit`` every ``nn.Linear`` that
  transformers' bitsandbytes quantizer converts (all but the output embedding and tied weights) is packed 4-bit,
  0.5 byte per weight, plus its quant state: one absmax per block of 64 weights (float32; with double quantisation
  uint8, plus one float32 absmax per 256 of those, a float32 offset and a 256-entry float32 code) and the 16-entry
  float32 NF4/FP4 code. Embeddings, norms, biases and ``lm_head`` are not quantised, and peft's
  ``prepare_model_for_kbit_training`` (which trl-plus calls for a trainable 4-bit model) casts them to float32
  (``quantization.upcast: false`` keeps them in the model's dtype, and the residual stream with them).
- **LoRA**: peft's own count (``get_peft_model`` on the meta model); TRL casts a quantised model's adapters to
  bfloat16.
- **gradients**: one per trainable parameter, in its dtype.
- **optimiser states**: see :data:`OPTIMIZERS`.
- **activations**: :func:`activation_bytes`.
- **LM head**: TRL's fused head never builds the ``[N, V]`` logits: a ``[4096, 32768]`` tile in the compute dtype,
  the scored hidden states (a copy) and their float32 gradient; a method with ``needs.logits`` gets full logits.
- **reference**: ``adapter`` (LoRA switched off) and ``precomputed`` cost no weights at train time; ``model`` is a
  second, frozen copy (quantised like the policy, its other weights in the reference dtype). **teacher**: the same.
- **CUDA overhead**: :data:`CUDA_CONTEXT_BYTES` plus :data:`ALLOCATOR_SLACK` of the allocated peak.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelSpec, QuantizationSpec, Recipe, locate
from ..errors import TrlPlusError

GIB = 1024**3
#: Card sizes the verdict is given for (GiB, as the cards are sold: "24 GB" holds 24 GiB).
CARD_SIZES_GIB = (8, 12, 16, 24, 48, 80)
#: Memory the card holds that ``torch.cuda.max_memory_allocated`` does not count: the CUDA context with its kernels
#: (~0.5 GiB on recent drivers) and the cuBLAS/cuDNN workspaces (~0.25 GiB).
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: The caching allocator reserves more than it hands out (block rounding, fragmentation): this fraction of the peak.
ALLOCATOR_SLACK = 0.10
#: bitsandbytes' 4-bit layout (``bitsandbytes.functional.quantize_4bit``).
BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, BNB_CODE_4BIT, BNB_CODE_NESTED = 64, 256, 16, 256
#: bitsandbytes' 8-bit optimisers: tensors under ``min_8bit_size`` keep float32 states; blocks of 256 values, one
#: float32 absmax each (``bitsandbytes.optim.optimizer.Optimizer2State.init_state``).
BNB_MIN_8BIT_SIZE, BNB_OPTIM_BLOCKSIZE = 4096, 256
#: TRL's fused LM head tiles (``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE``, ``_CHUNKED_LOGPROB_CHUNK_SIZE``).
FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK = 4096, 32768
#: K for a method whose number of sequences per example varies (``--sequences`` overrides it).
DEFAULT_VARIABLE_K = 8

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: ``training.optim`` -> (states per parameter, bytes per state value or None for "the parameter's dtype", rule).
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw_torch": ("adam", "torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype; step on the CPU"),
    "adamw_torch_fused": ("adam", "torch fused AdamW: exp_avg and exp_avg_sq in the parameter's dtype, a float32 "
                                  "step per tensor"),  # fmt: skip
    "adamw_bnb_8bit": ("adam8", "bitsandbytes 8-bit AdamW: 2 × 1 byte + 2 float32 absmax per 256 values (float32 "
                                "states for tensors < 4096 values)"),  # fmt: skip
    "adamw_8bit": ("adam8", "bitsandbytes 8-bit AdamW (as adamw_bnb_8bit)"),
    "paged_adamw_8bit": ("adam8", "bitsandbytes paged 8-bit AdamW (states in unified memory: evictable to the CPU "
                                  "under pressure, not counted by torch.cuda.max_memory_allocated)"),  # fmt: skip
    "paged_adamw_32bit": ("adam32", "bitsandbytes paged AdamW: 2 float32 states per value (unified memory: "
                                    "evictable, not counted by torch.cuda.max_memory_allocated)"),  # fmt: skip
    "sgd": ("none", "torch SGD without momentum (the Trainer's default): no state"),
    "rmsprop": ("one", "torch RMSprop: square_avg in the parameter's dtype"),
    "adafactor": ("factored", "transformers Adafactor (no beta1): float32 row + column second moments of a matrix, "
                              "a full float32 one for a vector (approximate: small scalars left out)"),  # fmt: skip
}


@dataclass
class Line:
    """One row of the breakdown: ``bytes`` and the rule that gave them. ``phase``: rows of different phases of the
    backward (the LM head's, a decoder layer's) are not live at the same time: the peak counts the largest phase."""

    name: str
    bytes: int
    note: str = ""
    phase: str = ""


@dataclass
class Estimate:
    """The predicted peak memory of one recipe, line by line, with a verdict per card size."""

    recipe: str
    setup: dict[str, Any]
    lines: list[Line] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        """The predicted ``torch.cuda.max_memory_allocated``: every line, of the phases only the largest."""
        phases: dict[str, int] = {}
        for line in self.lines:
            phases[line.phase] = phases.get(line.phase, 0) + line.bytes
        always = phases.pop("", 0)
        return always + max(phases.values(), default=0)

    @property
    def total(self) -> int:
        """What the card must hold: the allocated peak, the allocator's slack and the CUDA context."""
        return self.allocated + int(ALLOCATOR_SLACK * self.allocated) + CUDA_CONTEXT_BYTES

    def verdicts(self) -> dict[int, bool]:
        """``{card GiB: fits}`` for :data:`CARD_SIZES_GIB`."""
        return {size: self.total <= size * GIB for size in CARD_SIZES_GIB}

    def table(self) -> str:
        """The breakdown as text: one row per line, the totals, then the verdict per card."""
        rows = [(line.name + (f" [{line.phase}]" if line.phase else ""), gib(line.bytes), line.note)
                for line in self.lines]
        phases = sorted({line.phase for line in self.lines if line.phase})
        rows += [("allocated peak", gib(self.allocated), "torch.cuda.max_memory_allocated" + (
                  f"; of the phases [{'], ['.join(phases)}] only the largest counts" if len(phases) > 1 else "")),
                 ("allocator slack", gib(int(ALLOCATOR_SLACK * self.allocated)), f"{ALLOCATOR_SLACK:.0%} of the peak"),
                 ("CUDA context", gib(CUDA_CONTEXT_BYTES), "context + cuBLAS workspaces (not in max_memory_allocated)"),
                 ("total", gib(self.total), "")]  # fmt: skip
        width = max(len(r[0]) for r in rows)
        setup = ", ".join(f"{k} {v}" for k, v in self.setup.items())
        out = [f"{self.recipe}: {setup}", "", f"{'term':<{width}}  {'GiB':>7}  rule"]
        out.append(f"{'-' * width}  {'-' * 7}  {'-' * 4}")
        for name, size, note in rows:
            if name == "allocated peak":
                out.append(f"{'-' * width}  {'-' * 7}")
            out.append(f"{name:<{width}}  {size:>7}  {note}".rstrip())
        out.append("")
        out.append("fits: " + "  ".join(f"{s} GB {'yes' if ok else 'no'}" for s, ok in self.verdicts().items()))
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (``--json``)."""
        return {
            "recipe": self.recipe, "setup": self.setup,
            "lines": [{"name": x.name, "bytes": x.bytes, "note": x.note, "phase": x.phase}
                      for x in self.lines],
            "allocated_bytes": self.allocated, "total_bytes": self.total,
            "fits": {f"{size}GB": ok for size, ok in self.verdicts().items()},
        }  # fmt: skip


def gib(n: int) -> str:
    """``n`` bytes in GiB, two decimals."""
    return f"{n / GIB:.2f}"


# -- the model from its config ---------------------------------------------------------------------------------


def load_config(spec: ModelSpec | Any, key: str = "model"):
    """The model's ``transformers`` config from ``spec.name_or_path`` (alias, GGUF file, local folder or a reachable
    hub name); never loads weights."""
    from transformers import AutoConfig

    from ..models.load import resolve_model_path

    path = resolve_model_path(spec.name_or_path, getattr(spec, "gguf_file", None), key)
    try:
        return AutoConfig.from_pretrained(path, revision=getattr(spec, "revision", None),
                                          trust_remote_code=getattr(spec, "trust_remote_code", False))  # fmt: skip
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrlPlusError(f"{key}.name_or_path: cannot read the config of {spec.name_or_path!r} ({reason[:160]}); "
                           f"pass a local model directory with its config.json: --set {key}.name_or_path=DIR") from None


def meta_model(config, trust_remote_code: bool = False):
    """The causal LM of ``config`` with every parameter on the meta device (shapes only, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def quantized_linear_names(model) -> set[str]:
    """The ``nn.Linear`` modules transformers' bitsandbytes quantizer converts to 4-bit: all but those
    ``get_keys_to_not_convert`` keeps (the output embedding, tied weights, the last module)."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(model))
    return {name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)}  # fmt: skip


def quantized_weight_bytes(numel: int, quant: QuantizationSpec) -> int:
    """Bytes of one 4-bit weight of ``numel`` values and its quant state, exactly as bitsandbytes stores them."""
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    size = (numel + 1) // 2 + 4 * BNB_CODE_4BIT  # packed uint8 pairs, the NF4/FP4 code
    if quant.double_quant:  # uint8 absmax + float32 absmax per 256 of them + offset + the blockwise code
        return size + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4 + 4 * BNB_CODE_NESTED
    return size + 4 * blocks


def _dtype_name(spec: ModelSpec | Any, config) -> str:
    dtype = getattr(spec, "dtype", None) or "auto"
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    return dtype if dtype in DTYPE_BYTES else "float32"


def weight_bytes(model, spec: ModelSpec | Any, config, trainable: bool) -> tuple[int, int, str]:
    """``(quantised bytes, other bytes, note)`` of a model's weights as trl-plus loads it (see the module doc)."""
    dtype = _dtype_name(spec, config)
    quant = getattr(spec, "quantization", None)
    if quant is None or not quant.load_in_4bit:
        total = sum(p.numel() for p in model.parameters()) * DTYPE_BYTES[dtype]
        return 0, total, dtype
    targets = quantized_linear_names(model)
    quantized = sum(quantized_weight_bytes(m.weight.numel(), quant) for n, m in model.named_modules() if n in targets)
    packed = {id(m.weight) for n, m in model.named_modules() if n in targets}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    rest_dtype = "float32" if trainable and quant.upcast else dtype  # prepare_model_for_kbit_training upcasts them
    note = (f"{len(targets)} Linear 4-bit {quant.quant_type}{' + double quant' if quant.double_quant else ''}; "
            f"{rest / 1e6:.0f} M other in {rest_dtype}")  # fmt: skip
    return quantized, rest * DTYPE_BYTES[rest_dtype], note


def lora_parameters(model, spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every trainable parameter peft adds for ``spec.lora`` (``get_peft_model`` on the meta
    model; ``modules_to_save`` copies included)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from ..models.load import lora_config

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads transformers' deprecated checkpointing flag
        peft_model = get_peft_model(model, lora_config(spec.lora))
    return [(n, tuple(p.shape)) for n, p in peft_model.named_parameters() if p.requires_grad]


def lora_linear_inputs(model, params: list[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """``{projection name: input features}`` of the Linear layers that carry an adapter (by leaf name: the
    decoder's layers are alike; an adapted embedding keeps only its ``[N, r]`` lookup, left out)."""
    import torch

    found = {}
    for name, _ in params:
        if ".lora_A." not in name:
            continue
        path = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        base = model.get_submodule(path)
        base = getattr(base, "base_layer", base)
        if isinstance(base, torch.nn.Linear):
            found[path.rsplit(".", 1)[-1]] = base.in_features
    return found


# -- optimiser states ------------------------------------------------------------------------------------------


def optimizer_state_bytes(optim: str, shapes: list[tuple[int, ...]], param_bytes: int) -> tuple[int, str]:
    """``(bytes, rule)`` of ``training.optim``'s state for trainable tensors of ``shapes`` whose values take
    ``param_bytes`` each (see :data:`OPTIMIZERS`)."""
    if optim not in OPTIMIZERS:
        raise TrlPlusError(f"training.optim: the estimate knows {', '.join(OPTIMIZERS)}; got {optim!r} (estimate "
                           "with --set training.optim=adamw_torch for a near figure)")  # fmt: skip
    kind, rule = OPTIMIZERS[optim]
    numels = [math.prod(s) for s in shapes]
    if kind == "adam":
        fused = 4 * len(shapes) if optim.endswith("fused") else 0  # the per-tensor float32 step on the device
        return 2 * param_bytes * sum(numels) + fused, rule
    if kind == "adam32":
        return 8 * sum(numels), rule
    if kind == "adam8":
        small = sum(n for n in numels if n < BNB_MIN_8BIT_SIZE)
        large = [n for n in numels if n >= BNB_MIN_8BIT_SIZE]
        blocks = sum(math.ceil(n / BNB_OPTIM_BLOCKSIZE) for n in large)
        qmaps = 2 * 256 * 4 if large else 0  # the signed and unsigned dynamic maps, shared
        return 8 * small + 2 * sum(large) + 8 * blocks + qmaps, rule
    if kind == "one":
        return param_bytes * sum(numels), rule
    if kind == "factored":
        return 4 * sum(s[0] + s[1] if len(s) == 2 else math.prod(s) for s in shapes), rule
    return 0, rule


# -- activations -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """The decoder's sizes, from its config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        """Read from a transformers config (its text config for a multimodal model)."""
        c = config.get_text_config()
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                   vocab=c.vocab_size)  # fmt: skip


def layer_bytes_per_token(s: Shapes, act: int, compute: int, quantized: bool, lora: dict[str, int], lora_r: int,
                          dropout: bool, full_finetune: bool) -> int:  # fmt: skip
    """Bytes one decoder layer (attention + gated MLP) keeps for its backward, per token.

    ``act``: bytes of the residual stream's dtype; ``compute``: of the matmul dtype (bitsandbytes' compute dtype or
    autocast's). ``lora``: targeted projection -> its input features. Terms: the two norm outputs; q, k, v; rotated
    q, k; attention output and its reshaped copy; gate, up, SiLU(gate), their product (act each); a 4-bit Linear saves
    its input cast to the compute dtype (when that differs); LoRA saves the dropout mask (1 byte) and the dropped
    input (compute dtype) per targeted projection, or only the cast input without dropout, plus its rank-r
    intermediate. ``full_finetune``: every Linear's input is already one of the tensors above (nothing more)."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    attention = act * (h + (q + 2 * kv) + (q + kv) + 2 * q) + 4 * s.heads  # + the float32 logsumexp
    mlp = act * (h + 4 * i)
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    casts = compute * sum(inputs.values()) if quantized and act != compute and not full_finetune else 0
    adapters = 0
    for features in lora.values():
        adapters += lora_r * compute  # lora_A's output, saved by lora_B
        if dropout:
            adapters += features * (1 + compute)
        elif act != compute:
            adapters += features * compute
    return attention + mlp + casts + adapters


def activation_lines(s: Shapes, tokens: int, sequences: int, length: int, act: int, compute: int,
                     quantized: bool, lora: dict[str, int], lora_r: int, dropout: bool, full_finetune: bool,
                     checkpointing: bool, eager: bool) -> list[Line]:  # fmt: skip
    """The activation lines for ``tokens`` tokens in ``sequences`` rows of ``length`` (see
    :func:`layer_bytes_per_token`). With checkpointing: one hidden state per layer (its input) plus one layer's
    full activations while it is recomputed for its backward; without: every layer's. Both add the backward's
    transient gradients of one layer (2 hidden + 2 intermediate per token, act dtype). Eager attention adds the
    ``[heads, L, L]`` scores and probabilities per row (act) and the dropout-free softmax gradient; SDPA keeps none."""
    per_layer = layer_bytes_per_token(s, act, compute, quantized, lora, lora_r, dropout, full_finetune)
    scores = 3 * act * s.heads * length * length * sequences if eager else 0
    transient = Line("backward transients", tokens * act * (2 * s.hidden + 2 * s.intermediate),
                     "gradients of one layer: 2 × (hidden + intermediate) per token",
                     phase="layer" if checkpointing else "")  # fmt: skip
    if checkpointing:
        return [
            Line("activations: checkpoints", s.layers * tokens * s.hidden * act,
                 f"{s.layers} layers × {tokens} tokens × hidden {s.hidden} × {act} B"),  # fmt: skip
            Line("activations: one layer", tokens * per_layer + scores,
                 f"recomputed for its backward: {per_layer / 1024:.0f} KiB/token"
                 + (", eager attention scores" if eager else ""), phase="layer"),  # fmt: skip
            transient,
        ]
    return [
        Line("activations: all layers", s.layers * (tokens * per_layer + scores) + tokens * s.hidden * act,
             f"{s.layers} layers × {per_layer / 1024:.0f} KiB/token × {tokens} tokens (no checkpointing)"),
        transient,
    ]


def head_line(s: Shapes, tokens: int, act: int, compute: int, full_logits: bool, phase: str) -> Line:
    """The LM head's working set: TRL's fused head (one ``[4096, 32768]`` tile, the scored hidden states and their
    float32 gradient) or, for ``needs.logits``, the ``[N, V]`` logits, a float32 log-softmax and their gradient.
    ``phase``: ``"head"`` with checkpointing (its buffers are freed before a layer is recomputed), else ``""``."""
    if full_logits:
        return Line("logits (full)", tokens * s.vocab * (2 * compute + 4),
                    f"method needs logits: [{tokens}, {s.vocab}] × ({compute} + 4 + {compute}) B", phase=phase)
    tile = min(tokens, FUSED_TOKEN_CHUNK) * FUSED_VOCAB_CHUNK * compute
    return Line("LM head (fused)", tile + tokens * s.hidden * (act + 4),
                f"tile [{min(tokens, FUSED_TOKEN_CHUNK)}, {FUSED_VOCAB_CHUNK}] + hidden copy + fp32 grad",
                phase=phase)  # fmt: skip


def scored_logits_lines(s: Shapes, tokens: int, needs: Any, live_logits: list[str], phase: str) -> list[Line]:
    """The ``[M, V]`` logits at the scored positions a method reads (``Needs.scored_logits``, teachers giving
    ``"logits"`` live), at the upper bound M = every token of the batch: the policy's with grad (float32 logits,
    log-softmax and gradient; ``ctx.logps_at`` alone needs one 1024-row chunk of that), each teacher's without."""
    lines = []
    if needs.scored_logits:
        lines.append(Line("policy scored logits", tokens * s.vocab * 12,
                          f"≤ [{tokens}, {s.vocab}] × (4 + 4 + 4) B if the loss calls ctx.scored_logits() (logps_at "
                          "alone: one chunk)", phase=phase))  # fmt: skip
    for name in live_logits:
        lines.append(Line(f"teacher {name} scored logits", tokens * s.vocab * 4,
                          f"≤ [{tokens}, {s.vocab}] × 4 B, no grad", phase=phase))  # fmt: skip
    return lines


# -- the recipe --------------------------------------------------------------------------------------------------


def _training(recipe: Recipe) -> dict[str, Any]:
    """The recipe's ``training`` block checked against its method's config (``trl.DPOConfig``; a group method's
    ``trl.GRPOConfig``); trl-plus's own keys are kept."""
    from .validate import RUN_TRAINING_KEYS, training_schema, validate_training

    own = (*RUN_TRAINING_KEYS, "prefix_sharing", "packing")
    checked = validate_training({k: v for k, v in recipe.training.items() if k not in own},
                                lambda key: locate(recipe, key), *training_schema(_method(recipe)))  # fmt: skip
    return {**checked, **{k: recipe.training[k] for k in own if k in recipe.training}}


def _method(recipe: Recipe):
    from pydantic import ValidationError

    from ..config import explain
    from ..registry import get_registry

    try:
        cls = get_registry().get(recipe.method)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{locate(recipe, 'method')}: {exc}") from None
    try:
        return cls(cls.Config(**recipe.method_args))
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, recipe._source, prefix=("method_args",), model=cls.Config,
                                   overridden=recipe._overridden)) from None  # fmt: skip


def frozen_model_line(name: str, spec: ModelSpec | Any, key: str) -> Line:
    """The weights of a frozen model (reference or teacher) as trl-plus loads it: no LoRA, no upcast."""
    config = load_config(spec, key)
    model = meta_model(config, getattr(spec, "trust_remote_code", False))
    quantized, rest, note = weight_bytes(model, spec, config, trainable=False)
    return Line(name, quantized + rest, f"frozen copy: {note}")


def teacher_line(name: str, spec: Any, key: str) -> Line:
    """A teacher's weights on the accelerator during training: a frozen model's, an adapter's file (on the policy's
    base: no second base), or nothing when its outputs are precomputed columns."""
    label = f"teacher {name} ({'adapter' if spec.adapter else spec.mode})"
    if spec.mode == "precomputed":
        return Line(label, 0, "precomputed into cached columns before training (loaded then, freed after)")
    if spec.adapter is not None:
        files = list(Path(spec.adapter).expanduser().glob("adapter_model.*"))
        size = sum(f.stat().st_size for f in files)
        return Line(label, size, "a frozen LoRA adapter on the policy's base: its file's bytes"
                    + ("" if files else " (no adapter file yet: 0)"))  # fmt: skip
    return frozen_model_line(label, spec, key)


def estimate(recipe: Recipe, sequences: int | None = None, prompt_tokens: int = 0) -> Estimate:
    """Predict the peak accelerator memory of training ``recipe`` (see the module doc for every rule).

    ``sequences``: K for a method whose K varies (default :data:`DEFAULT_VARIABLE_K`); ``prompt_tokens``: the shared
    prompt's length with ``training.prefix_sharing`` (a row then holds ``P + K (max_length - P)`` tokens)."""
    from trl import DPOConfig

    from ..trainers.frozen import resolve_reference_mode

    method = _method(recipe)
    if recipe.model.kind == "diffusion":
        raise TrlPlusError(f"{recipe._source}: model.kind: trl-plus estimate predicts the memory of causal LMs; a "
                           "diffusion pipeline is not estimated yet (train a few steps and read the peak instead)")
    training = _training(recipe)
    spec = recipe.model
    config = load_config(spec)
    shapes = Shapes.of(config)
    model = meta_model(config, spec.trust_remote_code)
    quant = spec.quantization if spec.quantization is not None and spec.quantization.load_in_4bit else None

    batch = int(training.get("per_device_train_batch_size", DPOConfig.per_device_train_batch_size))
    length = int(training.get("max_length") or DPOConfig.max_length or 1024)
    k = getattr(method, "sequences_per_example", 2)
    k_note = ""
    if method.trainer == "group":  # rows are completions: prompt + max_new_tokens each, one sequence per row
        rollout = method.needs.rollout.updated(recipe.rollout.model_dump(exclude_none=True, exclude={"scorers"})
                                               if recipe.rollout else {})  # fmt: skip
        k, length = 1, prompt_tokens + int(rollout.decoding.get("max_new_tokens", 256))
        k_note = f" (completions: {prompt_tokens} prompt + {length - prompt_tokens} new tokens; --prompt-tokens)"
    if k is None:
        k, k_note = sequences or DEFAULT_VARIABLE_K, " (varies: assumed; --sequences)"
    sharing = bool(training.get("prefix_sharing"))
    row = prompt_tokens + k * (length - prompt_tokens) if sharing else k * length
    rows = batch if sharing else batch * k
    tokens = batch * row
    checkpointing = training.get("activation_checkpointing", DPOConfig.gradient_checkpointing)
    if spec.gradient_checkpointing is not None:
        checkpointing = spec.gradient_checkpointing
    optim = str(training.get("optim", DPOConfig.optim))
    optim = getattr(optim, "value", optim)

    dtype = _dtype_name(spec, config)
    compute = DTYPE_BYTES[quant.compute_dtype if quant and quant.compute_dtype != "auto" else dtype]
    fp16_or_bf16 = training.get("bf16", True) or training.get("fp16", False)
    compute = compute if fp16_or_bf16 or quant else DTYPE_BYTES[dtype]
    # 4-bit: the upcast norms/embeddings carry a float32 residual stream (``quantization.upcast: false``: the dtype's)
    act = 4 if quant and quant.upcast else DTYPE_BYTES[dtype]

    lines: list[Line] = []
    quantized, rest, note = weight_bytes(model, spec, config, trainable=True)
    lines.append(Line("base weights", quantized + rest, note))
    blocks = [spec.lora] if spec.lora else list((spec.adapters or {}).values())  # model.adapters: each trains
    if blocks:
        params = lora_parameters(model, spec.model_copy(update={"lora": blocks[0], "adapters": None}))
        lora_inputs = lora_linear_inputs(model, params)
        for other in blocks[1:]:  # (peft wraps its model in place: a fresh meta model per further adapter)
            params += lora_parameters(meta_model(config, spec.trust_remote_code),
                                      spec.model_copy(update={"lora": other, "adapters": None}))  # fmt: skip
        param_bytes = 2 if quant else DTYPE_BYTES[dtype]  # TRL casts a quantised model's adapters to bfloat16
        count = sum(math.prod(sh) for _, sh in params)
        ranks = (f"r {spec.lora.r}" if spec.lora else
                 "adapters " + ", ".join(f"{n} r {a.r}" for n, a in spec.adapters.items()))  # fmt: skip
        lines.append(Line("LoRA parameters", count * param_bytes,
                          f"{count:,} ({ranks}) in {'bfloat16' if quant else dtype}"))  # fmt: skip
        dropout = any(b.dropout > 0 for b in blocks)
    else:
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        param_bytes, count = DTYPE_BYTES[dtype], sum(math.prod(sh) for _, sh in params)
        lora_inputs, dropout = {}, False
    lines.append(Line("gradients", count * param_bytes, f"{count:,} trainable × {param_bytes} B"))
    state, rule = optimizer_state_bytes(optim, [sh for _, sh in params], param_bytes)
    lines.append(Line(f"optimiser ({optim})", state, rule))

    eager = (spec.attn_implementation or "sdpa") == "eager"
    activations = activation_lines(shapes, tokens, rows, row, act, compute, quant is not None, lora_inputs,
                                   max((b.r for b in blocks), default=0), dropout, not blocks, bool(checkpointing),
                                   eager)  # fmt: skip
    forwards = len(method.needs.policy_adapters)
    if forwards > 1:  # one policy forward per named adapter, each graph kept until the one backward
        kept = activations[0]
        activations[0] = Line(kept.name, kept.bytes * forwards, f"{kept.note}, × {forwards} policy forwards (one per "
                              "adapter) before the backward", kept.phase)  # fmt: skip
    lines += activations
    lines.append(head_line(shapes, tokens, act, compute, method.needs.logits or method.needs.hidden_states,
                           "head" if checkpointing else ""))
    given = {name: spec for _, name, spec in recipe.teacher_blocks()}
    live_logits = [name for name, kinds in method.needs.frozen_sources().items()
                   if "logits" in kinds and name in given and given[name].mode == "live"]  # fmt: skip
    lines += scored_logits_lines(shapes, tokens, method.needs, live_logits, "head" if checkpointing else "")

    mode = resolve_reference_mode(method, recipe.reference.mode, spec.uses_lora, False,
                                  iterated=recipe.iterations is not None)  # fmt: skip
    if method.trainer == "group":  # GRPO's KL term alone needs a reference
        mode = ("adapter" if spec.uses_lora else "model") if getattr(method.config, "beta", 0) > 0 else "none"
    if mode == "model":
        ref = recipe.reference
        ref_spec = spec
        if ref.name_or_path or ref.dtype:
            ref_spec = ModelSpec(name_or_path=ref.name_or_path or spec.name_or_path,
                                 gguf_file=ref.gguf_file if ref.name_or_path else spec.gguf_file,
                                 dtype=ref.dtype or spec.dtype, quantization=spec.quantization)  # fmt: skip
        lines.append(frozen_model_line("reference (model)", ref_spec, "reference"))
    else:
        lines.append(Line(f"reference ({mode})", 0, {"adapter": "the policy with its adapter switched off",
                                                     "precomputed": "log-probs computed before training",
                                                     "none": "no reference"}[mode]))  # fmt: skip
    for key, name, teacher in recipe.teacher_blocks():
        lines.append(teacher_line(name, teacher, key))

    setup = {
        "model": f"{shapes.layers} layers, hidden {shapes.hidden}, vocab {shapes.vocab}",
        "tokens": f"{tokens} ({batch} × {k} × {length}{k_note}{', prefix sharing' if sharing else ''})",
        "checkpointing": "on" if checkpointing else "off",
        "reference": mode,
    }
    return Estimate(recipe._source, setup, lines)
