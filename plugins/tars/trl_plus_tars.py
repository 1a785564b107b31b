"""TARS — MinMax Token-Adaptive Preference Strategy (Zhang et al., arXiv 2507.21584), text-only variant.

Inner "max" (no gradient, in the collator): for the chosen sequences of a batch, and separately for the rejected
ones, each token gets a relevance r_i ∈ [0, 1] (a per-token column of the data, else a built-in score function)
and a perturbation score s_i = (1 − r_i) / max_j (1 − r_j). N = max(1, ⌊n·p⌋) positions (n: the non-padding tokens
of those sequences; p = ``adv_p``) are drawn without replacement with probability s_i / Σ_j s_j; BOS/EOS/PAD among
them are dropped; the others are replaced by a uniform random id in [5, vocab) (``replace``) or a mask token
(``mask``) and leave the scored tokens (label −100).

Outer "min", with ℓ the token-sum log-prob of the (perturbed) response ỹ and the reference on the same inputs:

    L_pref = −log σ( β [ (ℓθ(ỹ_w) − ℓref(ỹ_w)) − (ℓθ(ỹ_l) − ℓref(ỹ_l)) ] )
    L_freq = max(0, MSE(|F z_pw|, |F z_cw|) − MSE(|F z_pw|, |F z_cr|) + m)
    L      = mean_pairs L_pref + β_fre · L_freq

where z_pw is the policy's hidden state (layer 0: the input embeddings) of the perturbed chosen sequence, z_cw and
z_cr the reference's on the original chosen and rejected sequences, F the FFT along the sequence axis and |·| its
magnitude (official ``frequency_triplet_loss``: first example of the batch only). The image-contrast term of the
multimodal original needs images and is left out. p = 0 and β_fre = 0 is DPO exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from trl_plus import DPO, DPOConfig, LossContext, LossOutput, Needs, Paper, TrlPlusError, hookimpl

RELEVANCE_COLUMNS = ("chosen_relevance", "rejected_relevance")
REPLACE_MIN_ID = 5  # official code: torch.randint(low=5, high=vocab_size) (skips LLaMA's first special ids)


def uniform_relevance(input_ids, attention_mask, completion_mask):
    """Built-in relevance ``uniform``: every token equally irrelevant (r = 0), so every non-padding token is
    equally likely to be perturbed (the official ``perturb_tokens_randomly`` idea, with exactly N draws)."""
    import torch

    return torch.zeros(input_ids.shape, dtype=torch.float32)


#: Built-in per-token relevance functions, ``(input_ids, attention_mask, completion_mask) -> [N, L]`` relevance in
#: [0, 1] (1 = never perturbed). Add an entry to plug in another score, then select it with ``relevance: name``.
RELEVANCE_FUNCTIONS: dict[str, Callable] = {"uniform": uniform_relevance}


class TARSConfig(DPOConfig):
    """TARS hyperparameters (defaults: official code, ``llava/train/train.py`` and ``llava_trainer.py``)."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature (code: adv_loss default 0.1, not exposed)")
    adv_p: float = Field(
        0.05, ge=0, le=1, description="p, fraction of the batch's tokens drawn for perturbation (code: adv_p 0.05)"
    )
    token_mode: Literal["replace", "mask"] = Field(
        "replace", description="replace: uniform random id in [5, vocab); mask: the mask/unk/pad id (code: replace)"
    )
    relevance: str = Field(
        "uniform",
        description="built-in per-token relevance used where the data has no relevance column "
        "(RELEVANCE_FUNCTIONS; the paper's CLIP image similarity has no text-only counterpart)",
    )
    relevance_column: Literal["auto", "require", "ignore"] = Field(
        "auto",
        description="chosen_relevance / rejected_relevance columns: use when present (auto), demand them "
        "(require, as the original's CLIP scores) or ignore them",
    )
    perturb_prompt: bool = Field(
        True, description="prompt tokens may be perturbed too (code: the whole tokenised sequence is scored)"
    )
    beta_fre: float = Field(
        0.1, ge=0, description="β_fre, weight of the FFT triplet term; 0 turns it off (code: beta_fre 0.1)"
    )
    freq_margin: float = Field(0.5, ge=0, description="margin m of the FFT triplet term (code: 0.5, hard-coded)")
    freq_layer: int = Field(0, ge=0, description="hidden-state index of z (code: 0, the input-embedding output)")
    freq_examples: Literal["first", "all"] = Field(
        "first", description="FFT triplet on the first pair of the batch (code) or averaged over all pairs"
    )
    seed: int = Field(0, description="seed of the perturbation RNG: same seed, same perturbed batches (ours)")

    @field_validator("relevance")
    @classmethod
    def _known_relevance(cls, value: str) -> str:
        if value not in RELEVANCE_FUNCTIONS:
            raise ValueError(f"unknown relevance {value!r}; built-in: {', '.join(RELEVANCE_FUNCTIONS)}")
        return value


# -- data: tokenization and the inner perturbation step --------------------------------------------------------


def _full_relevance(values, prompt_len: int, completion_len: int, column: str) -> list[float]:
    """One relevance per token of prompt+completion from a column's list (None/NaN → 1.0, never perturbed)."""
    values = [1.0 if v is None or v != v else float(v) for v in values]
    if any(v < 0 or v > 1 for v in values):
        raise TrlPlusError(f"tars: column {column!r} has values outside [0, 1] (1 = relevant, never perturbed)")
    if len(values) == prompt_len + completion_len:
        return values
    if len(values) in (completion_len, completion_len - 1):  # response only, with or without the appended EOS
        return [1.0] * prompt_len + values + [1.0] * (completion_len - len(values))
    raise TrlPlusError(
        f"tars: column {column!r} has {len(values)} values but the tokenized example has {prompt_len} prompt and "
        f"{completion_len} response tokens (EOS included): give one relevance per prompt+response token "
        f"({prompt_len + completion_len}) or per response token ({completion_len} or {completion_len - 1})"
    )


def tokenizer_facts(tokenizer) -> dict:
    """What the perturbation needs of the tokenizer: vocabulary size, the mask id (the code's fallbacks: mask, unk,
    pad, 0) and the ids never perturbed (BOS, EOS, PAD)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    mask_id = tokenizer.mask_token_id or tokenizer.unk_token_id or tokenizer.pad_token_id or 0
    return {"vocab_size": tokenizer.vocab_size, "mask_id": mask_id, "special_ids": sorted(special)}


def tokenize_tars(example: dict, tokenizer, relevance_column: str = "auto") -> dict:
    """The tokenize hook: TRL's pair tokenization and the relevance columns checked and aligned to
    prompt+response tokens."""
    from trl_plus import tokenize_completions

    out = tokenize_completions(
        tokenizer, example["prompt"], {"chosen_ids": example["chosen"], "rejected_ids": example["rejected"]}
    )
    if relevance_column == "ignore":
        return out
    for column, side in zip(RELEVANCE_COLUMNS, ("chosen_ids", "rejected_ids")):
        if example.get(column) is not None:
            out[column] = _full_relevance(example[column], len(out["prompt_ids"]), len(out[side]), column)
        elif relevance_column == "require":
            raise TrlPlusError(
                f"tars: the data has no {column!r} (relevance_column: require). Add columns chosen_relevance and "
                "rejected_relevance (one relevance in [0, 1] per prompt+response or per response token, 1 = never "
                "perturbed) to every row, or set method_args.relevance_column: auto to use the built-in "
                "relevance function"
            )
    return out


def perturbation_probabilities(relevance, candidates):
    """``[N, L]`` draw probabilities: s = (1 − r) on candidate positions, divided by its max, then normalised
    over all positions (official ``perturb_tokens_with_labels`` + ``generate_probabilistic_topk_mask``)."""
    scores = (1.0 - relevance) * candidates
    if scores.max() > 0:
        scores = scores / scores.max()
    total = scores.sum()
    return scores / total if total > 0 else scores


def sample_positions(relevance, candidates, ratio: float, generator):
    """``[N, L]`` bool: N = max(1, ⌊n·ratio⌋) positions (n = candidate count; none when ratio is 0 or no position
    has a positive score) drawn without replacement with :func:`perturbation_probabilities`."""
    import torch

    probs = perturbation_probabilities(relevance, candidates)
    drawn = torch.zeros(probs.shape, dtype=torch.bool)
    num = min(max(1, int(int(candidates.sum()) * ratio)), int((probs > 0).sum())) if ratio > 0 else 0
    if num > 0:
        drawn.view(-1)[torch.multinomial(probs.view(-1), num, replacement=False, generator=generator)] = True
    return drawn


@functools.cache
def _collator_class():
    """The collator class, built on first use so that importing the plugin does not import torch/TRL."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    @dataclasses.dataclass
    class TARSCollator(DataCollatorForPreference):
        """TRL's pairwise collator followed by TARS's seeded token perturbation of chosen and rejected rows."""

        config: Any = None
        info: Any = None  # tokenizer_facts(tokenizer)
        keep_original: bool = False
        generator: Any = None

        def __post_init__(self):
            self.generator = torch.Generator().manual_seed(self.config.seed)

        def _relevance(self, examples, batch):
            cfg = self.config
            relevance = RELEVANCE_FUNCTIONS[cfg.relevance](
                batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            ).float()
            if cfg.relevance_column == "ignore":
                return relevance
            size = len(examples)
            for k, column in enumerate(RELEVANCE_COLUMNS):
                for b, example in enumerate(examples):
                    values = example.get(column)
                    if values is None:
                        continue
                    if self.max_length is not None:  # the collator's truncation, applied to the scores
                        keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(
                            -self.max_length, None)  # fmt: skip
                        values = values[keep]
                    values = [1.0 if v is None else v for v in values]  # as the tokenize hook writes them
                    relevance[k * size + b, : len(values)] = torch.tensor(values, dtype=torch.float32)
            return relevance

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            cfg, info = self.config, self.info
            input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
            if self.keep_original:
                batch["tars_original_input_ids"] = input_ids.clone()
            candidates = batch["attention_mask"].bool()
            if not cfg.perturb_prompt:
                candidates &= completion_mask.bool()
            relevance = self._relevance(examples, batch)
            special = torch.isin(input_ids, torch.tensor(info["special_ids"], dtype=input_ids.dtype))
            perturbed = torch.zeros_like(candidates)
            size = len(examples)
            for rows in (slice(0, size), slice(size, 2 * size)):  # chosen, then rejected (as the code)
                drawn = sample_positions(relevance[rows], candidates[rows], cfg.adv_p, self.generator)
                mask = drawn & ~special[rows]
                if cfg.token_mode == "replace":
                    high = info["vocab_size"]
                    random_ids = torch.randint(REPLACE_MIN_ID, high, mask.shape, generator=self.generator)
                    input_ids[rows][mask] = random_ids[mask].to(input_ids.dtype)
                else:
                    input_ids[rows][mask] = info["mask_id"]
                perturbed[rows] = mask
            completion_mask[perturbed] = 0  # perturbed tokens are not scored (label −100)
            batch["tars_perturbed"] = perturbed
            return batch

    return TARSCollator


# -- the outer loss ----------------------------------------------------------------------------------------------


def frequency_triplet_loss(z_pw, z_cw, z_cr, margin: float = 0.5):
    """Official ``frequency_triplet_loss`` for ``[L, D]`` inputs (``[B, L, D]``: per-pair losses ``[B]``):
    relu(MSE(|FFT z_pw|, |FFT z_cw|) − MSE(|FFT z_pw|, |FFT z_cr|) + margin), FFT along the sequence axis."""
    import torch

    def spectrum(x):
        return torch.fft.fft(x.float(), dim=-2).abs()

    anchor = spectrum(z_pw)
    positive = (anchor - spectrum(z_cw)).pow(2).mean(dim=(-2, -1))
    negative = (anchor - spectrum(z_cr)).pow(2).mean(dim=(-2, -1))
    return torch.relu(positive - negative + margin)


def _reference_hidden_states(trainer, inputs, layer: int, rows):
    """Hidden states ``[len(rows), L, D]`` of the reference (a separate model, or the policy with its adapter off)
    on the original (unperturbed) sequences ``rows``, without gradient."""
    import contextlib

    import torch
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import use_adapter

    model, adapter = trainer.ref_model, contextlib.nullcontext()
    if model is None:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if not is_peft_model(unwrapped):
            raise TrlPlusError(
                "tars: the FFT triplet term needs the reference's hidden states; reference.mode precomputed has no "
                "reference model: use reference.mode auto (or set method_args.beta_fre: 0)"
            )
        model = trainer.model
        adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    with torch.no_grad(), adapter, trainer.accelerator.autocast():
        outputs = model(
            input_ids=inputs["tars_original_input_ids"][rows], attention_mask=inputs["attention_mask"][rows],
            output_hidden_states=True, use_cache=False, logits_to_keep=1,
        )  # fmt: skip
    return outputs.hidden_states[layer]


class TARS(DPO):
    """DPO on token-perturbed pairs (relevance-weighted, seeded, in the collator) plus an FFT triplet term."""

    name = "tars"
    taxonomy = {"data.granularity": "token", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.divergence": "generalization", "property": "other-analysis", "scope": "image+text",
                "source": "inferred"}
    paper = Paper(
        "TARS: MinMax Token-Adaptive Preference Strategy for Hallucination Reduction in MLLMs",
        "2507.21584",
        code="KejiaZhang-Robust/TARS",
    )
    summary = "DPO on relevance-weighted token-perturbed pairs + FFT triplet on embeddings (text-only)"
    needs = Needs(reference="yes", optional_fields=RELEVANCE_COLUMNS, hidden_states=True)
    Config = TARSConfig
    tokenize = staticmethod(tokenize_tars)
    tokenized_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        cfg = self.config
        optional = () if cfg.relevance_column == "ignore" else RELEVANCE_COLUMNS
        self.needs = dataclasses.replace(type(self).needs, optional_fields=optional, hidden_states=cfg.beta_fre > 0,
                                         precomputable_reference=cfg.adv_p == 0)  # fmt: skip
        self.tokenize = functools.partial(tokenize_tars, relevance_column=cfg.relevance_column)

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """TRL's pairwise collator + the seeded perturbation; keeps the original ids when the triplet term is on.
        Needs ``self.tokenizer`` (set by the trainer) for the vocabulary size and special ids."""
        if self.tokenizer is None:
            raise TrlPlusError("tars: set method.tokenizer before building the collator (PlusTrainer does it)")
        return _collator_class()(
            pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode, config=self.config,
            info=tokenizer_facts(self.tokenizer), keep_original=self.config.beta_fre > 0,
        )  # fmt: skip

    def reference(self, trainer, inputs):
        """The core's reference log-probs (on the perturbed inputs, as the code); with the triplet term on, also
        the reference's hidden states of the original chosen and rejected sequences, in ``inputs``."""
        if self.config.beta_fre > 0:
            size = inputs["input_ids"].size(0) // 2
            n = 1 if self.config.freq_examples == "first" else size
            rows = [*range(n), *range(size, size + n)]
            hidden = _reference_hidden_states(trainer, inputs, self.config.freq_layer, rows)
            inputs["tars_ref_hidden"] = hidden.view(2, n, *hidden.shape[1:])
        return None

    def freq_loss(self, ctx: LossContext):
        """L_freq of the batch: the policy's perturbed-chosen hidden states against the reference's original ones."""
        reference = ctx.batch["tars_ref_hidden"]  # [2, n, L, D]: original chosen, original rejected
        n = reference.size(1)
        z_pw = ctx.outputs.hidden_states[self.config.freq_layer][:n]  # rows 0..n-1: perturbed chosen
        return frequency_triplet_loss(z_pw, reference[0], reference[1], self.config.freq_margin).mean()

    def loss(self, ctx: LossContext) -> LossOutput:
        """DPO on the perturbed pairs (the mask already leaves out perturbed tokens) + β_fre · L_freq."""
        dpo = super().loss(ctx)
        metrics = {"tars/dpo_loss": dpo.loss.detach()}
        if "tars_perturbed" in ctx.batch:
            perturbed, tokens = ctx.batch["tars_perturbed"], ctx.batch["attention_mask"]
            metrics["tars/perturbed_fraction"] = perturbed.sum() / tokens.sum().clamp(min=1)
        loss = dpo.loss
        if self.config.beta_fre > 0:
            freq = self.freq_loss(ctx)
            loss = loss + self.config.beta_fre * freq.to(loss.dtype)
            metrics["tars/freq_loss"] = freq.detach()
        return LossOutput(loss=loss, rewards=dpo.rewards, metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``tars``."""
    register(TARS)
