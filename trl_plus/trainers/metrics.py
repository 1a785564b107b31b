"""The step metrics every trainer logs under the same names, so ``trl-plus report``, ``eval`` and ``compare`` read
any run: ``logps/chosen`` / ``logps/rejected`` (sequence or denoising log-probs) and, from a loss's ``rewards``,
``rewards/{chosen,rejected,accuracies,margins}`` (TRL's DPOTrainer names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def gathered_mean(accelerator, value) -> float:
    """The mean of ``value`` (a number or a tensor) over every process's copy (accelerate's gather)."""
    import torch

    value = torch.as_tensor(value, device=accelerator.device, dtype=torch.float32)
    return accelerator.gather_for_metrics(value.detach().reshape(-1)).mean().item()


def append_pair_metrics(metrics: dict[str, list[float]], logps, rewards, mean: Callable[[Any], float]) -> None:
    """Append the step's ``logps/*`` (``logps`` ``[K, B]``) and ``rewards/*`` (``rewards`` ``[K, B]`` or ``None``) to
    ``metrics``; ``mean`` reduces a tensor across processes."""
    logps = logps.detach()
    metrics["logps/chosen"].append(mean(logps[0]))
    if logps.size(0) > 1:
        metrics["logps/rejected"].append(mean(logps[1]))
    if rewards is not None and rewards.size(0) > 1:
        rewards = rewards.detach()
        metrics["rewards/chosen"].append(mean(rewards[0]))
        metrics["rewards/rejected"].append(mean(rewards[1]))
        metrics["rewards/accuracies"].append(mean((rewards[0] > rewards[1]).float()))
        metrics["rewards/margins"].append(mean(rewards[0] - rewards[1]))
