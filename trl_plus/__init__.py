"""trl-plus: preference-optimization methods from the literature as plugins of one TRL trainer.

This is the stable surface: a plugin imports from ``trl_plus`` (and ``trl_plus.testing`` in its tests), never from
the modules below it, so the core can move without breaking plugins. The contract and the built-in methods import
eagerly (no torch); the trainer, the collators and the commands load torch only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__  # noqa: F401 (re-exported)
from .builtin.diffusion import DiffusionDPO, DiffusionDPOConfig
from .builtin.dpo import DPO, DPOConfig, dpo_losses
from .builtin.group import GRPO, GroupContext, GroupMethod, rollout_token_logps, turn_sums
from .builtin.metrics import pair_accuracy
from .builtin.online import OnlineMethod
from .builtin.sft import SFT
from .config import Recipe, load_recipe
from .contract import (
    TAXONOMY,
    Environment,
    EnvironmentConfig,
    FrozenOutputs,
    IterationContext,
    ListField,
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Metric,
    ModelAlias,
    Needs,
    Paper,
    PolicyOutputs,
    Rollout,
    Rollouts,
    Scorer,
    Stage,
    TopK,
    hookimpl,
)
from .data.tokenize import tokenize_completions
from .diffusion.method import DiffusionMethod, ImageRollouts, Scoring, denoising_errors
from .errors import TrlPlusError, did_you_mean
from .registry import get_method, get_registry
from .trainers.frozen import REFERENCE_MODES, Teacher, resolve_reference_mode

__all__ = [
    "DPO", "DPOConfig", "Environment", "EnvironmentConfig", "GRPO", "GroupContext", "GroupMethod", "PlusGRPOTrainer", "DiffusionDPO", "DiffusionDPOConfig", "DiffusionMethod", "DiffusionTrainer", "ImageRollouts", "FieldCollation",
    "FrozenOutputs", "IterationContext", "ListField", "LossContext", "LossOutput", "Method", "MethodConfig", "Metric", "ModelAlias", "Needs",
    "PairwiseCollator", "Paper", "PlusTrainer", "Rollout", "Rollouts", "PolicyOutputs", "REFERENCE_MODES", "Recipe", "SFT", "Sequence", "Scoring",
    "SequencesCollator", "Scorer", "Stage", "TAXONOMY", "Teacher", "TopK", "Inversion", "TrainResult", "TrlPlusError", "check_recipe",
    "combine", "generate", "load_run", "trained_module",
    "ddim_invert", "ddim_sample", "flow_elbo_factor", "guided_prediction", "inversion_timesteps", "Noised", "OnlineMethod", "ScoreOutput", "run_stages",
    "LatentCollator", "load_latent", "segment_ids", "denoise", "denoiser_kind", "has_lora",
    "sample", "Trajectory", "ParameterState", "ddim_step_logp", "ddim_step_mean", "ddim_sigma", "implied_noise",
    "reward_guidance", "sampling_timesteps", "flow_sigmas", "gaussian_logp", "predicted_x0", "save_image",
    "denoising_errors", "did_you_mean", "dpo_losses", "evaluate", "get_method", "get_registry", "hookimpl", "load_recipe",
    "merge_adapter", "method_collator", "pair_accuracy", "prompt_completion", "resolve_reference_mode", "tokenize_completions",
    "train", "frozen_model", "rollout_token_logps", "turn_sums",
]  # fmt: skip

if TYPE_CHECKING:
    from .data.collate import (
        FieldCollation,
        PairwiseCollator,
        Sequence,
        SequencesCollator,
        method_collator,
        prompt_completion,
    )
    from .diffusion.data import LatentCollator, load_latent, save_image, segment_ids
    from .diffusion.inversion import Inversion, ddim_invert, ddim_sample, guided_prediction, inversion_timesteps
    from .diffusion.models import denoise, denoiser_kind, has_lora
    from .diffusion.sampling import (
        ParameterState,
        Trajectory,
        ddim_sigma,
        ddim_step_logp,
        ddim_step_mean,
        flow_sigmas,
        gaussian_logp,
        implied_noise,
        predicted_x0,
        reward_guidance,
        sample,
        sampling_timesteps,
    )
    from .diffusion.scorer import Noised, ScoreOutput, flow_elbo_factor
    from .diffusion.trainer import DiffusionTrainer
    from .models.load import frozen_model
    from .run.evaluate import evaluate
    from .run.generate import generate, load_run
    from .run.merge import merge_adapter
    from .run.train import TrainResult, train
    from .run.validate import check_recipe
    from .trainers.adapters import combine, trained_module
    from .trainers.group import PlusGRPOTrainer
    from .trainers.preference import PlusTrainer
    from .trainers.stages import run_stages

#: Names that need torch/TRL, imported on first access: name -> module.
_LAZY = {
    "PlusTrainer": "trainers.preference",
    "PlusGRPOTrainer": "trainers.group",
    "frozen_model": "models.load",
    "DiffusionTrainer": "diffusion.trainer",
    "sample": "diffusion.sampling",
    "Trajectory": "diffusion.sampling",
    "ParameterState": "diffusion.sampling",
    "ddim_step_logp": "diffusion.sampling",
    "ddim_step_mean": "diffusion.sampling",
    "ddim_sigma": "diffusion.sampling",
    "implied_noise": "diffusion.sampling",
    "reward_guidance": "diffusion.sampling",
    "sampling_timesteps": "diffusion.sampling",
    "flow_sigmas": "diffusion.sampling",
    "gaussian_logp": "diffusion.sampling",
    "predicted_x0": "diffusion.sampling",
    "save_image": "diffusion.data",
    "Inversion": "diffusion.inversion",
    "Noised": "diffusion.scorer",
    "ScoreOutput": "diffusion.scorer",
    "LatentCollator": "diffusion.data",
    "denoise": "diffusion.models",
    "denoiser_kind": "diffusion.models",
    "has_lora": "diffusion.models",
    "load_latent": "diffusion.data",
    "segment_ids": "diffusion.data",
    "flow_elbo_factor": "diffusion.scorer",
    "ddim_invert": "diffusion.inversion",
    "ddim_sample": "diffusion.inversion",
    "guided_prediction": "diffusion.inversion",
    "inversion_timesteps": "diffusion.inversion",
    "PairwiseCollator": "data.collate",
    "SequencesCollator": "data.collate",
    "Sequence": "data.collate",
    "FieldCollation": "data.collate",
    "prompt_completion": "data.collate",
    "method_collator": "data.collate",
    "train": "run.train",
    "TrainResult": "run.train",
    "evaluate": "run.evaluate",
    "merge_adapter": "run.merge",
    "check_recipe": "run.validate",
    "run_stages": "trainers.stages",
    "combine": "trainers.adapters",
    "trained_module": "trainers.adapters",
    "generate": "run.generate",
    "load_run": "run.generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'trl_plus' has no attribute {name!r}")
