"""DSO-DRO — Direct Reward Optimization from "DSO: Aligning 3D Generators with Simulation Feedback for Physical
Soundness" (arXiv 2503.22677, ICCV 2025; official code RuiningLi/dso ``finetune.py`` ``forward_dro_loss``).

Per example a stable sample x0⁺ (reward 1) and an unstable one x0⁻ (reward 0); one t (logit-normal, μ = 1, s = 1)
shared by both, ε drawn independently for each; flow target ε − x0; e the element-mean squared error. The loss is
reference-free and sigmoid-free:

    L = mean over examples of (e_θ(x0⁺) − e_θ(x0⁻))

It is unbounded below (raising e(x0⁻) without limit keeps lowering it): the official brakes are the step count
(4000) and LoRA. This plugin adds an optional guard, ``loser_error_cap``: the unstable sample's error stops
counting once it exceeds the cap (L = mean(e⁺ − min(e⁻, cap)), no gradient past it), and logs ``dro/loser_error``.
The code's DPO variant (β = 500, independent noise) is ``flow-dpo`` with ``training.share_noise: false``.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Scoring,
    denoising_errors,
    hookimpl,
)


class DSODROConfig(MethodConfig):
    """DSO-DRO hyperparameters: none in the official loss; the optional guard."""

    loser_error_cap: float | None = Field(
        None, gt=0, description="guard: e(x0⁻) counts only up to this value (None: the official unbounded loss)")


class DSODRO(DiffusionMethod):
    """mean(e⁺ − e⁻) on flow-velocity errors, t shared and ε independent per example; no reference."""

    name = "dso-dro"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": (), "scope": "3d", "source": "inferred"}
    family = "flow"
    paper = Paper("DSO: Aligning 3D Generators with Simulation Feedback for Physical Soundness", "2503.22677",
                  code="RuiningLi/dso")  # fmt: skip
    summary = "reference-free mean(e⁺ − e⁻) of flow errors on stable vs unstable samples (unbounded: cap/guard)"
    needs = Needs(reference="no", precomputable_reference=False)
    Config = DSODROConfig
    scoring = Scoring(targets=("flow",), share_timestep=True, share_noise=False)
    example_model = {"kind": "diffusion", "name_or_path": "tiny-sd3"}

    def loss(self, ctx: LossContext) -> LossOutput:
        """mean(e⁺ − e⁻) (``e⁻`` capped by the guard when set); rewards −e (lower error = preferred)."""
        errors, _ = denoising_errors(ctx)
        positive, negative = errors[0], errors[1]
        cap = self.config.loser_error_cap
        counted = negative if cap is None else negative.clamp(max=cap)
        loss = (positive - counted).mean()
        return LossOutput(loss, rewards=-errors.detach(),
                          metrics={"dro/loser_error": negative.detach().mean(), "dro/winner_error": positive.detach().mean()})


@hookimpl
def register_methods(register):
    register(DSODRO)
