"""MAH-DPO — Multi-Action-Head DPO (Simultaneous Multi-objective Alignment Across Verifiable and Non-verifiable
Rewards, arXiv 2510.01167; official code pearls-lab/multiobj-align, ``mah_dpo/``).

One shared backbone and one LM head per objective, k = 0..N−1. Pair i carries its objective k_i (column
``objective``) and is scored by head k_i alone, against the reference's head k_i (every reference head is the SFT
model's own head):

    ℓθ,k(y) = Σ_t log softmax(W_k h_t)[y_t],    Δ_i = [ℓθ,k(y_w) − ℓref(y_w)] − [ℓθ,k(y_l) − ℓref(y_l)]
    L_i = −(1 − ε) log σ(β Δ_i) − ε log σ(−β Δ_i)
    L = (1 / |K_b|) Σ_{k ∈ K_b} mean_{i: k_i = k} L_i          (K_b: the objectives present in the batch)

Every objective weighs the same whatever its count in the batch; head k gets gradient from its own pairs only, the
backbone (its LoRA adapter) from all. Policy heads start as the SFT head plus 0.001·N(0, I) noise (seed 42 + 100k,
as the code). Batches hold B/N pairs of each objective (the code's balanced batching). At inference the heads
mix by a weighted average of their logits, Σ w̃_k W_k h with w̃ = w / Σ w (``trl-plus generate RUN --weights``).

Here the N policy heads are one extra module ``objective_heads`` (an ``[N·V, H]`` linear layer: head k is rows
k·V … (k+1)·V), trained (with LoRA: in ``modules_to_save``, saved with the adapter); the model's own ``lm_head``
stays the SFT head, so the reference (the adapter off, or a frozen copy) is the SFT model with no extra head.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import (
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Needs,
    Paper,
    PolicyOutputs,
    TrlPlusError,
    hookimpl,
    trained_module,
)

#: The module holding the policy heads, and the data column naming each pair's objective (head).
HEADS, OBJECTIVE = "objective_heads", "objective"


class MAHDPOConfig(MethodConfig):
    """MAH-DPO hyperparameters (the official scripts' values)."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature shared by all heads (all official scripts: 0.1)")
    num_heads: int = Field(2, ge=1, description="N, objectives = heads (paper: 2 for math and tutoring, 3 for human "
                                                "values)")  # fmt: skip
    head_noise: float = Field(0.001, ge=0, description="std of the noise added to every policy head at init "
                                                       "(official code: 0.001; 0 = exact copies of the SFT head)")
    seed: int = Field(42, description="noise seed of head 0; head k uses seed + 100·k (official code: 42)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε, conservative DPO (official default: 0)")
    balanced: bool = Field(True, description="batches hold B/N pairs of each objective, every objective truncated "
                                             "to the smallest one (official batching); false: the trainer's shuffle")


def objective_losses(losses, objectives, num_heads: int):
    """``(scalar, [N] per-objective means, [N] bool present)``: the mean over the objectives present of each
    objective's mean per-pair loss."""
    import torch

    onehot = torch.nn.functional.one_hot(objectives.long(), num_heads).to(losses.dtype)  # [B, N]
    counts = onehot.sum(0)
    means = (onehot * losses[:, None]).sum(0) / counts.clamp(min=1)
    present = counts > 0
    return means[present].mean(), means, present


def mix_head_logits(logits, weights=None):
    """``[N, ..., V]`` per-head logits -> the ensemble's logits ``Σ w̃_k logits_k``, ``w̃ = w / Σ w`` (uniform
    when ``weights`` is ``None``): a weighted average of logits, not of probabilities (as the official code)."""
    import torch

    w = normalised(weights, logits.shape[0])
    return torch.einsum("k,k...->...", torch.tensor(w, dtype=logits.dtype, device=logits.device), logits)


def normalised(weights, num_heads: int) -> list[float]:
    """``w / Σ w`` (uniform for ``None``), checked: one non-negative weight per head, not all zero."""
    if weights is None:
        return [1.0 / num_heads] * num_heads
    if len(weights) != num_heads or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise TrlPlusError(f"--weights: mah-dpo mixes its {num_heads} heads: give {num_heads} non-negative weights, "
                           f"not all zero (got {list(weights)})")  # fmt: skip
    return [w / sum(weights) for w in weights]


class BalancedSampler:
    """Row indices in batches of ``batch_size`` that hold ``batch_size / N`` rows of each of the ``N`` objectives
    present (shuffled within the batch); each epoch every objective is shuffled and truncated to the smallest one's
    count, as the official code's balanced datasets."""

    def __init__(self, objectives: list[int], batch_size: int, generator):
        self.groups = {k: [i for i, o in enumerate(objectives) if o == k] for k in sorted(set(objectives))}
        self.generator = generator
        share, rest = divmod(batch_size, len(self.groups))
        if rest or share == 0:
            raise TrlPlusError(f"mah-dpo's balanced batches hold the same number of pairs of each of the "
                               f"{len(self.groups)} objectives in the data: per_device_train_batch_size "
                               f"({batch_size}) must be a multiple of {len(self.groups)} (or method_args.balanced: "
                               "false)")  # fmt: skip
        self.share = share
        self.batches = min(len(g) for g in self.groups.values()) // share
        if self.batches == 0:
            raise TrlPlusError(f"mah-dpo's balanced batches need {share} pairs of every objective; the smallest has "
                               f"{min(len(g) for g in self.groups.values())}")  # fmt: skip

    def __len__(self) -> int:
        return self.batches * self.share * len(self.groups)

    def __iter__(self):
        import torch

        drawn = [torch.tensor(g)[torch.randperm(len(g), generator=self.generator)] for g in self.groups.values()]
        for b in range(self.batches):
            batch = torch.cat([rows[b * self.share : (b + 1) * self.share] for rows in drawn])
            yield from batch[torch.randperm(len(batch), generator=self.generator)].tolist()


class MAHDPO(Method):
    name = "mah-dpo"
    taxonomy = {"data.feedback": ("pair", "point"), "data.granularity": "sentence", "learning.paradigm": "offline",
                "learning.objective": "multi-objective", "constraint.reference": "fixed", "property": (),
                "scope": "text", "source": "inferred"}
    family = "multi-objective"
    paper = Paper("Simultaneous Multi-objective Alignment Across Verifiable and Non-verifiable Rewards", "2510.01167",
                  code="pearls-lab/multiobj-align")  # fmt: skip
    summary = "one LM head per objective, each trained by DPO on its objective's pairs; heads mixed by logits"
    needs = Needs(reference="yes", fields=(OBJECTIVE,))
    Config = MAHDPOConfig
    trainable_modules = (HEADS,)
    example_data = {"path": "recipes/data/mah_dpo_sample.jsonl"}

    # -- data ---------------------------------------------------------------------------------------------------
    def prepare_data(self, dataset, split):
        """Rows unchanged; every ``objective`` must be a head index ``0 .. num_heads − 1``."""
        n = self.config.num_heads
        for row, value in enumerate(dataset[OBJECTIVE]):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise TrlPlusError(f"row {row + 1}: objective {value!r} is not one of the declared heads 0..{n - 1} "
                                   f"(method_args.num_heads: {n})")  # fmt: skip
        return dataset

    def sampler(self, dataset, batch_size, generator):
        return BalancedSampler(list(dataset[OBJECTIVE]), batch_size, generator) if self.config.balanced else None

    # -- the heads ----------------------------------------------------------------------------------------------
    def prepare_model(self, model):
        """Add ``objective_heads``: N copies of the SFT head, each plus ``head_noise``·N(0, I) drawn with seed
        ``seed + 100·k`` (CPU generator), in the head's dtype and device."""
        import torch

        lm_head = model.get_output_embeddings()
        weight = lm_head.weight.detach()
        if getattr(lm_head, "bias", None) is not None:
            raise TrlPlusError("mah-dpo copies a bias-free LM head; this model's head has a bias")
        vocab, hidden = weight.shape
        heads = torch.nn.utils.skip_init(torch.nn.Linear, hidden, vocab * self.config.num_heads, bias=False,
                                         dtype=weight.dtype, device=weight.device)  # (no draw from the global RNG)
        with torch.no_grad():
            for k in range(self.config.num_heads):
                rows = weight.clone()
                if self.config.head_noise:
                    generator = torch.Generator().manual_seed(self.config.seed + 100 * k)
                    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
                    rows += self.config.head_noise * noise.to(weight.device)
                heads.weight[k * vocab : (k + 1) * vocab] = rows
        model.add_module(HEADS, heads)
        return model

    def head_weights(self, heads):
        """``[N, V, H]`` view of the stacked heads' weight."""
        return heads.weight.view(self.config.num_heads, -1, heads.weight.size(-1))

    def policy_forward(self, trainer, model, inputs):
        """One backbone forward; each row's label log-probs under its objective's head only (chunked, so memory
        holds one chunk of logits)."""
        import torch

        hidden = trainer.policy_hidden(model, inputs)  # [K*B, T, H]
        weights = self.head_weights(trainer.policy_module(model, HEADS))
        objectives = inputs[OBJECTIVE].to(hidden.device).long()
        per_row = objectives.repeat(hidden.size(0) // objectives.size(0))  # rows are sequence-major
        logps = hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        for k in per_row.unique().tolist():
            rows = (per_row == k).nonzero()[:, 0]
            logps = logps.index_copy(0, rows, trainer.head_logps(hidden[rows], weights[k], inputs, rows))
        return PolicyOutputs(logps)

    def generation_model(self, model, weights):
        """The model whose LM head is Σ w̃_k W_k: the weighted average of the heads' logits (linear heads without
        bias), uniform without ``--weights``; a one-hot weight is that head alone."""
        import torch

        heads = self.head_weights(trained_module(model, HEADS))
        w = torch.tensor(normalised(weights, self.config.num_heads), dtype=heads.dtype, device=heads.device)
        mixed = torch.nn.utils.skip_init(torch.nn.Linear, heads.size(-1), heads.size(1), bias=False,
                                         dtype=heads.dtype, device=heads.device)  # fmt: skip
        with torch.no_grad():
            mixed.weight.copy_(torch.einsum("k,kvh->vh", w, heads))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_output_embeddings(mixed)
        return model

    # -- the objective ------------------------------------------------------------------------------------------
    def loss(self, ctx: LossContext) -> LossOutput:
        import torch.nn.functional as F

        c = self.config
        if ctx.num_sequences != 2:
            raise TrlPlusError(f"mah-dpo scores pairs (chosen, rejected); got {ctx.num_sequences} sequences")
        ratios = ctx.logps() - ctx.ref_logps()
        delta = ratios[0] - ratios[1]
        losses = -(1 - c.label_smoothing) * F.logsigmoid(c.beta * delta) - c.label_smoothing * F.logsigmoid(
            -c.beta * delta)
        objectives = ctx.batch[OBJECTIVE].to(losses.device)
        loss, means, present = objective_losses(losses, objectives, c.num_heads)
        metrics = {f"mah/loss_objective_{k}": means[k].detach() for k in range(c.num_heads) if present[k]}
        return LossOutput(loss, rewards=c.beta * ratios.detach(), metrics=metrics)


@hookimpl
def register_methods(register):
    register(MAHDPO)
