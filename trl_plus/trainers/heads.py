"""The LM head applied to final hidden states at the scored positions only, in chunks: the policy's
``ctx.scored_logits()`` / ``ctx.logps_at(ids)`` (with grad) and a frozen source's top-k and scored logits (no grad).

The policy's forward keeps TRL's fused head (no ``[N, L, V]`` logits); :func:`capture_hidden` records the backbone's
last hidden state during that same forward (one forward, DDP's hooks intact), and :class:`HiddenHead` projects the
rows a loss asks for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

#: Scored positions per chunk: one chunk's ``[CHUNK, V]`` logits are the most that is ever alive at once.
CHUNK = 1024


def _causal_lm(model):
    """The causal LM inside ``model`` (DDP/accelerate wrappers and a PEFT wrapper removed; the LoRA layers stay
    injected in its modules, so the active adapter still applies)."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    causal_lm = extract_model_from_parallel(model)
    return causal_lm.get_base_model() if isinstance(causal_lm, PeftModel) else causal_lm


@contextlib.contextmanager
def capture_hidden(model) -> Iterator[list]:
    """Record the last hidden state ``[N, L, H]`` of ``model``'s backbone (the module TRL's fused head calls: the
    causal LM's ``base_model``) during the forwards inside the block; yields the list it appends to. For the policy,
    whose forward must stay the one fused, differentiable (and DDP-synchronised) call."""
    seen: list = []

    def hook(_module, _args, output):
        seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = _causal_lm(model).base_model.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def backbone_hidden(model, model_kwargs) -> torch.Tensor:
    """``[N, L - 1, H]``: the backbone's last hidden states at the label positions, without any LM head (a frozen
    source whose outputs are all read from the hidden states: the head runs once, at the scored positions only)."""
    outputs = _causal_lm(model).base_model(**model_kwargs, use_cache=False)
    return outputs.last_hidden_state[:, :-1]


@contextlib.contextmanager
def checkpointing_off(model, kwargs=None) -> Iterator[None]:
    """Activation checkpointing off for a no-grad forward and back on after: TRL's ``disable_gradient_checkpointing``
    under transformers' current names (the deprecated ones warn at every step)."""
    enabled = model.is_activation_checkpointing
    if enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if enabled:
            options = dict(kwargs or {})  # split as transformers' Trainer does when it first enables it
            every_n_layers, offload = options.pop("every_n_layers", 1), options.pop("offload", False)
            model.activation_checkpointing_enable(options or None, every_n_layers=every_n_layers, offload=offload)


class HiddenHead:
    """``lm_head`` on hidden states ``[K, B, T, H]`` (aligned with ``ctx.token_logps``), at the positions a loss asks
    for. ``scale`` and ``softcap`` are the model's logit scaling and final soft-capping (TRL's fused head applies the
    same), so the logits equal the model's own."""

    def __init__(self, hidden: torch.Tensor, lm_head, scale: float = 1.0, softcap: float | None = None):
        self.hidden, self.weight, self.bias = hidden, lm_head.weight, getattr(lm_head, "bias", None)
        self.scale, self.softcap = scale, softcap

    @classmethod
    def of(cls, model, hidden: torch.Tensor) -> HiddenHead:
        """The head of ``model`` (a causal LM, PEFT-wrapped or not) on ``hidden``."""
        from accelerate.utils import extract_model_from_parallel

        config = extract_model_from_parallel(model).config.get_text_config()
        scale = getattr(config, "logit_scale", None) or 1.0
        return cls(hidden, extract_model_from_parallel(model).get_output_embeddings(), scale,
                   getattr(config, "final_logit_softcapping", None))  # fmt: skip

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[M, H] -> [M, V]`` float32 logits."""
        logits = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float() * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, where: torch.Tensor) -> torch.Tensor:
        """``[M, V]`` logits at the positions ``where`` (a ``[K, B, T]`` bool mask)."""
        return self.project(self.hidden[where])

    def logps_at(self, where: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[M, k]`` full-softmax log-probs of ``ids`` ``[M, k]`` at the positions ``where``; each chunk's logits are
        recomputed in the backward pass (activation checkpointing), so one chunk is alive at a time."""
        hidden = self.hidden[where]
        chunks = [self._chunk_logps(hidden[i : i + CHUNK], ids[i : i + CHUNK]) for i in range(0, len(hidden), CHUNK)]
        return torch.cat(chunks) if chunks else hidden.new_zeros((0, ids.size(-1)), dtype=torch.float32)

    def _chunk_logps(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        def gather(h):
            return torch.log_softmax(self.project(h), -1).gather(-1, ids)

        return checkpoint(gather, hidden, use_reentrant=False) if hidden.requires_grad else gather(hidden)

    def topk(self, where: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([M, k] ids, [M, k] full-softmax log-probs)`` of the ``k`` most likely next tokens, in chunks (no grad)."""
        hidden = self.hidden[where]
        ids, logps = [], []
        with torch.no_grad():
            for i in range(0, len(hidden), CHUNK):
                values, indices = torch.log_softmax(self.project(hidden[i : i + CHUNK]), -1).topk(k, -1)
                ids.append(indices)
                logps.append(values)
        if not ids:
            return hidden.new_zeros((0, k), dtype=torch.long), hidden.new_zeros((0, k), dtype=torch.float32)
        return torch.cat(ids), torch.cat(logps)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` log-probs of ``labels`` ``[N, T]`` under the linear head ``weight`` ``[V, H]`` on ``hidden``
    ``[N, T, H]`` at the positions ``where`` (zeros elsewhere; with grad to both), in checkpointed chunks: memory
    holds one chunk of logits (:meth:`HiddenHead.logps_at`)."""
    head = HiddenHead(hidden, _Weight(weight))
    at = head.logps_at(where, labels[where].clamp(min=0).unsqueeze(-1))[:, 0]
    return at.new_zeros(where.shape).masked_scatter(where, at)


class _Weight:
    """A bare linear head: a weight, no bias."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None


class LogitsHead:
    """A head over given full logits ``[K, B, T, V]`` (tests and hand-made contexts: ``trl_plus.testing``)."""

    def __init__(self, logits: torch.Tensor):
        self.full = logits

    def logits(self, where: torch.Tensor) -> torch.Tensor:
        return self.full[where].float()

    def logps_at(self, where: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(where), -1).gather(-1, ids)
