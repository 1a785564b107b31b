"""BRAIn — Bayesian Reward-conditioned Amortized Inference (Pandey et al., ICML 2024, arXiv 2402.02479).

The target is the reward-conditioned posterior p(y | x, good) ∝ p_prior(y|x)·exp(r(x, y)/τ) (the PPO-optimal policy
for a Bradley–Terry reward model); it is distilled into the policy from K reward-scored samples y_1..y_K ~ q(·|x)
per prompt with self-normalised importance weights:

    α̂_k = softmax_k( log p_prior(y_k|x) + r(x, y_k)/τ − log q(y_k|x) )      target weights, no gradient
    β̂_k = softmax_k( ℓθ(y_k|x) − log q(y_k|x) )                               the policy's, with gradient
    L(x) = −Σ_k α̂_k log β̂_k,          ∇θ L = −Σ_k (α̂_k − β̂_k) ∇θ ℓθ(y_k|x),          L = mean over prompts

ℓ are token-sum log-probs of the completion. The gradient is the author's BRAIn estimator
(gauravpandeyamu/BRAIn_experiments, ``gradient_estimators.py``: weights ``alpha_hat - beta_hat``); L is the
cross-entropy with exactly that gradient, i.e. the self-normalised KL Σ α̂ log(α̂/β̂) plus the constant H(α̂).
``log q`` does not cancel in β̂. q and p_prior are the reference model unless the data gives them as columns
``proposal_logps`` / ``prior_logps``. τ = 0 is the argmax limit (one-hot α̂ on the best reward): with K = 2 that
is DPO with β = 1 on (best, other) and q as its reference — the paper's "DPO-sft" special case.

Each prompt may have a different number of completions: one sequence per completion, only real ones forwarded;
both softmaxes run over each prompt's real samples (padded slots at −inf).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from trl_plus import (
    ListField,
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Needs,
    Paper,
    TrlPlusError,
    hookimpl,
)

COMPLETIONS, REWARDS, PROPOSAL, PRIOR = "completions", "rewards", "proposal_logps", "prior_logps"
LOGP_COLUMNS = (PROPOSAL, PRIOR)


class BRAInConfig(MethodConfig):
    """BRAIn hyperparameters (the paper's abstract and the toy code give neither τ nor K: see the README)."""

    tau: float = Field(
        1.0, ge=0, description="τ, reward temperature of the posterior p_prior·exp(r/τ) (inferred; 1 = a BT reward "
        "model's own logit scale); 0 = the argmax limit, one-hot on the best reward (the paper's DPO-sft case)",
    )  # fmt: skip
    num_samples: int | None = Field(
        None, ge=2, description="K: train on the first K completions of every row (each row must have K); None: "
        "all of each row's completions (K may vary per prompt)",
    )  # fmt: skip


def _column(ctx: LossContext, name: str, like):
    """``[K, B]`` per-sample values of a list column (``ctx.batch[name]`` ``[B, L]``), or ``None`` when absent."""
    import torch

    if name not in ctx.batch:
        return None
    values = torch.as_tensor(ctx.batch[name]).to(like.device, like.dtype)
    num = like.size(0)
    if values.dim() != 2 or values.size(0) != like.size(1) or values.size(1) < num:
        raise TrlPlusError(f"brain: column {name!r} has shape {tuple(values.shape)} but the batch has "
                           f"{like.size(1)} prompts of up to {num} completions: one value per completion")  # fmt: skip
    values = values[:, :num].T
    mask = ctx.batch.get(f"{name}_mask")
    if mask is not None:
        mask = torch.as_tensor(mask)[:, :num].T.to(like.device).bool()
        if not torch.equal(mask, ctx.sequence_mask.bool()):
            raise TrlPlusError(f"brain: column {name!r} does not have one value per completion in every row")
    return values


def log_weights(ctx: LossContext, tau: float):
    """The terms of the loss, each ``[K, B]`` (padded slots: −inf logits, 0 weights):

    ``(alpha, log_beta, real, rho, rewards)``: α̂ (no gradient), log β̂ (with gradient), the mask of real samples,
    ρ = ℓθ − log q (the policy's implicit reward, β = 1) and the rewards.
    """
    import torch

    policy = ctx.logps()
    real = ctx.sequence_mask.bool()
    rewards = _column(ctx, REWARDS, policy)
    if rewards is None:
        raise TrlPlusError("brain: the batch has no 'rewards' (one reward per completion, list column 'rewards')")
    proposal, prior = (_column(ctx, name, policy) for name in LOGP_COLUMNS)
    if (proposal is None or prior is None) and ctx.ref_token_logps is None:
        missing = " and ".join(repr(n) for n, v in zip(LOGP_COLUMNS, (proposal, prior)) if v is None)
        raise TrlPlusError(f"brain: no reference and no {missing} column: q and p_prior are the reference model "
                           "unless the data gives them; use reference.mode: auto, or add the columns")  # fmt: skip
    reference = ctx.ref_logps() if (proposal is None or prior is None) else None
    proposal = reference if proposal is None else proposal
    prior = reference if prior is None else prior
    neg_inf = float("-inf")
    with torch.no_grad():
        prior, proposal, rewards = prior.detach(), proposal.detach(), rewards.detach()
        if tau > 0:
            target = prior + rewards / tau - proposal
        else:  # τ → 0+: all mass on the best reward (ties: weighted by p_prior/q among them)
            best = rewards.masked_fill(~real, neg_inf)
            best = best == best.max(0, keepdim=True).values
            target = (prior - proposal).masked_fill(~best, neg_inf)
        alpha = torch.softmax(target.masked_fill(~real, neg_inf), dim=0)
    rho = policy - proposal
    log_beta = torch.log_softmax(rho.masked_fill(~real, neg_inf), dim=0)
    return alpha, log_beta, real, rho, rewards


class BRAIn(Method):
    """Distil the reward-conditioned posterior into the policy over K scored samples per prompt (self-normalised
    importance weights α̂ with the self-normalised baseline β̂)."""

    name = "brain"
    taxonomy = {"data.feedback": ("list", "point"), "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "text", "source": "inferred"}
    family = "listwise-ranking"
    paper = Paper("BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language generation from "
                  "feedback", "2402.02479")  # fmt: skip
    summary = "distil p_prior·exp(r/τ) from K scored samples per prompt: cross-entropy of SNIS weights α̂ vs β̂"
    needs = Needs(
        reference="optional",  # q = p_prior = the reference unless both columns are given
        list_fields=(
            ListField(COMPLETIONS, dtype="text"),
            ListField(REWARDS, same_length_as=COMPLETIONS),
            ListField(PROPOSAL, same_length_as=COMPLETIONS, required=False),
            ListField(PRIOR, same_length_as=COMPLETIONS, required=False),
        ),
    )
    Config = BRAInConfig
    data_fields = ("prompt",)  # + the list columns completions, rewards (Needs.list_fields)
    sequences_per_example = None
    tokenized_columns = ("prompt_ids", "completion_ids")
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/brain_sample.jsonl"}

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.sequences_per_example = self.config.num_samples  # None: K varies per prompt

    # -- data -----------------------------------------------------------------------------------------------
    def prepare_data(self, dataset: Any, split: str) -> Any:
        """Check every row (≥ 2 completions, finite numeric rewards, ``num_samples`` available, the optional
        log-prob columns in every row or none) and keep the first ``num_samples`` completions (idempotent)."""
        columns = [c for c in (COMPLETIONS, REWARDS, *LOGP_COLUMNS) if c in dataset.column_names]
        check_rows(dataset, self.config.num_samples)
        k = self.config.num_samples
        if k is None:
            return dataset
        return dataset.map(lambda row: {c: row[c][:k] for c in columns if row[c] is not None})

    def tokenize(self, example: dict[str, Any], tokenizer) -> dict[str, Any]:
        """``prompt_ids`` and ``completion_ids`` (one list per completion), as TRL's DPOTrainer tokenizes a pair
        (one shared prompt prefix, EOS appended to plain-text completions)."""
        from trl_plus import tokenize_completions

        completions = example[COMPLETIONS]  # prepare_data kept the first num_samples
        ids = tokenize_completions(tokenizer, example["prompt"], {str(k): c for k, c in enumerate(completions)})
        return {"prompt_ids": ids["prompt_ids"], "completion_ids": [ids[str(k)] for k in range(len(completions))]}

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """One sequence ``prompt + completion_k`` per completion (:class:`trl_plus.SequencesCollator`): rows with
        fewer completions have fewer sequences, padded slots are never forwarded."""
        from trl_plus import SequencesCollator, prompt_completion

        def sequences(example):
            return [prompt_completion(example["prompt_ids"], c) for c in example["completion_ids"]]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode)

    # -- the objective --------------------------------------------------------------------------------------
    def prompt_losses(self, ctx: LossContext):
        """``[B]`` per-prompt losses −Σ_k α̂_k log β̂_k and the terms of :func:`log_weights`."""
        import torch

        alpha, log_beta, real, rho, rewards = log_weights(ctx, self.config.tau)
        losses = -(alpha * torch.where(real, log_beta, torch.zeros_like(log_beta))).sum(0)
        return losses, (alpha, log_beta, real, rho, rewards)

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over prompts of −Σ α̂ log β̂. ``rewards`` (logged as ``rewards/*``) are ρ = ℓθ − log q of each
        prompt's best-reward sample (row 0) and worst-reward sample (row 1): ``rewards/margins`` = log β̂_best −
        log β̂_worst. Metrics: ``brain/best_weight`` (β̂ on the best-reward samples), ``brain/target_best_weight``
        (α̂ there), ``brain/margin`` (Σ α̂ ρ − mean ρ), ``brain/kl`` (Σ α̂ log α̂/β̂) and ``brain/ess`` (1/Σ α̂²)."""
        import torch

        losses, (alpha, log_beta, real, rho, rewards) = self.prompt_losses(ctx)
        with torch.no_grad():
            beta = log_beta.exp()
            high = rewards.masked_fill(~real, float("-inf"))
            best = high == high.max(0, keepdim=True).values
            low = rewards.masked_fill(~real, float("inf"))
            rho_real = torch.where(real, rho, torch.zeros_like(rho))
            count = real.sum(0)
            log_alpha = torch.where(alpha > 0, alpha.log(), torch.zeros_like(alpha))
            kl = (alpha * (log_alpha - torch.where(real, log_beta, torch.zeros_like(log_beta)))).sum(0)
            pick = torch.stack([high.argmax(0), low.argmin(0)])  # [2, B]
            implicit = rho.detach().gather(0, pick)
            metrics = {
                "brain/best_weight": (beta * best).sum(0).mean(),
                "brain/target_best_weight": (alpha * best).sum(0).mean(),
                "brain/margin": ((alpha * rho_real).sum(0) - rho_real.sum(0) / count).mean(),
                "brain/kl": kl.mean(),
                "brain/ess": (1 / (alpha**2).sum(0)).mean(),
            }
        return LossOutput(losses.mean(), rewards=implicit, metrics=metrics)


def check_rows(dataset: Any, num_samples: int | None) -> None:
    """One-line errors, naming the row and the column, for what the loss cannot use (the core checks each list's type,
    finiteness and length against ``completions``): fewer than 2 completions, fewer completions than ``num_samples``,
    a log-prob column missing in some rows."""
    completions = dataset[COMPLETIONS]
    for row, items in enumerate(completions, 1):
        if not isinstance(items, list) or len(items) < 2:
            count = len(items) if isinstance(items, list) else 0
            raise TrlPlusError(f"row {row}: column {COMPLETIONS!r} has {count} completion(s); BRAIn needs at least 2 "
                               "per prompt (one self-normalised weight is always 1): drop the row or add samples")  # fmt: skip
        if num_samples is not None and len(items) < num_samples:
            raise TrlPlusError(f"row {row}: column {COMPLETIONS!r} has {len(items)} completions but method_args."
                               f"num_samples is {num_samples}: lower num_samples to at most the fewest completions of "
                               "a row, or unset it (null) to train on every row's own completions")  # fmt: skip
    for name in LOGP_COLUMNS:
        if name not in dataset.column_names:
            continue
        values = dataset[name]
        present = [v is not None for v in values]
        if any(present) and not all(present):
            row = present.index(False) + 1
            raise TrlPlusError(f"row {row}: column {name!r} is empty (null) but other rows have it: give it in every "
                               "row or in none (then the reference model stands in)")  # fmt: skip


@hookimpl
def register_methods(register):
    """Register ``brain``."""
    register(BRAIn)
