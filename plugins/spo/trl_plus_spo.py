"""SPO — Step-aware Preference Optimization (Step-aware Preference Optimization: Aligning Preference with Denoising
Performance at Each Step, arXiv 2406.04314; official code RockeyCoss/SPO ``train_scripts/train_spo.py``,
``spo/custom_diffusers/multi_sample_pipeline.py``, ``spo/preference_models/compare_funcs.py``).

A step-wise branching sampler (DDIM, 20 steps, η = 1, CFG 5) makes the pairs: one chain for the first
``divert_start_step`` steps, then at every step k candidate next latents from the same x_t (one prediction, k noise
draws), each scored; the best and the worst candidate form a pair when their softmax weights differ by more than
``threshold``; the chain continues from a candidate drawn uniformly. Every kept pair is one DPO term on the
element-mean DDIM step log-densities ℓ of its two transitions (scored by the core, CFG-guided), as D3PO's:

    r = clip(exp(ℓ_θ − ℓ_ref), 1 − ε, 1 + ε),   L = −log σ(β·log r_w − β·log r_l)   (mean over kept pairs)

The paper's step-aware preference model (a time-conditioned PickScore) is not available here: a candidate is scored
by the run's own scorers on its predicted x̂0 at the next step (the final image at the last step) — the card's
recommended fallback; override :meth:`SPO.candidate_scores` for a step-aware scorer.

``variant: gradspo`` is GradSPO (A Gradient Guidance Perspective on Stepwise Preference Optimization for Diffusion
Models, NeurIPS 2025; official code JoshuaTTJ/GradSPO ``gradspo/custom_diffusers/loss.py``,
``train_scripts/train_gradspo.py``): the same sampler run by an EMA copy of the policy (decay ``ema_decay``, updated
after every optimizer step), each kept pair also storing d = (z_best − z_worst)/2 from the unit noises that made its
two candidates, and the step log-density replaced by a score-matching term on the shared x_t (c_t = √(1 − ᾱ_t),
g = ``grad_scale``, ε_m CFG-guided, the target detached):

    s_m(±) = −mean((ε_m − (ε_ema − g·c_t·(±d)))²),   m ∈ {θ, ref};   "+" the winner, "−" the loser

in the same clipped loss (log r_w = clip(s_θ(+) − s_ref(+)), log r_l = clip(s_θ(−) − s_ref(−))).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    ImageRollouts,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Scoring,
    TrlPlusError,
    hookimpl,
)

#: The official sampler (SD1.5 configs: 20 DDIM steps, η 1.0, guidance 5.0); one chain per prompt.
SPO_DECODING = {"steps": 20, "eta": 1.0, "guidance": 5.0}
#: The ImageRollouts column holding each prompt's kept pairs (a list of transition dicts per prompt).
PAIRS = "spo_pairs"
#: GradSPO's EMA sampler (``trainer.parameter_state(EMA)``).
EMA = "ema"


class SPOConfig(MethodConfig):
    """SPO hyperparameters (official SD1.5 config)."""

    beta: float = Field(10.0, gt=0, description="β, the DPO temperature (train.beta 10)")
    eps: float = Field(0.1, gt=0, lt=1, description="ε, the ratio clip [1 − ε, 1 + ε] (train.eps 0.1)")
    num_sample_each_step: int = Field(4, ge=2, description="k candidate next latents per step (4 SD1.5, 2 SDXL)")
    threshold: float = Field(0.3, ge=0, lt=1, description="min softmax gap of best and worst (0.3 SD1.5, 0.4 SDXL)")
    divert_start_step: int = Field(4, ge=0, description="steps followed by a single chain before branching (4)")
    candidate_view: Literal["predicted_x0", "latent"] = Field(
        "predicted_x0", description="what the fallback scorer sees of a candidate: its x̂0 at the next step (the "
                                    "official step-aware model's input) or the candidate latent itself")  # fmt: skip
    variant: Literal["spo", "gradspo"] = Field(
        "spo", description="spo: step log-densities of the stored candidates; gradspo: GradSPO's score-matching "
                           "term along the noise direction d, sampled by an EMA of the policy")  # fmt: skip
    grad_scale: float = Field(0.5, ge=0, description="GradSPO g, the size of the noise-direction shift (0.5)")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="GradSPO decay of the sampling EMA, updated after each "
                                                          "optimizer step (0.9)")  # fmt: skip


def preference_compare(scores, threshold: float):
    """The official ``preference_score_compare``: ``scores`` ``[k, B]`` -> ``(indices [2, B], valid [B])``, the
    best and the worst candidate of each column and whether their softmax weights differ by more than
    ``threshold``."""
    import torch

    ordered, indices = torch.sort(scores, dim=0, descending=True)
    weights = ordered[[0, -1], :].softmax(dim=0)
    return indices[[0, -1], :], weights[0] - weights[1] > threshold


def spo_losses(logps, ref_logps, beta: float, eps: float):
    """``([B] losses, [2, B] clipped log-ratios)``: −log σ(β·log r_w − β·log r_l) with
    log r = clamp(ℓ − ℓ_ref, log(1 − ε), log(1 + ε)) (the official clamp(exp(·)), without exp's overflow);
    ``logps`` / ``ref_logps`` ``[2, B]``, the winner at index 0."""
    import torch
    import torch.nn.functional as F

    log_ratios = torch.clamp(logps - ref_logps, math.log(1 - eps), math.log(1 + eps))
    return -F.logsigmoid(beta * (log_ratios[0] - log_ratios[1])), log_ratios


def gradspo_scores(prediction, ema_prediction, direction, alphas_t, grad_scale: float):
    """GradSPO's score-matching terms (the official ``score_matching_loss``): ``[N]``
    s = −mean over elements of (ε − (ε_ema − g·√(1 − ᾱ_t)·d))², the target detached. ``prediction`` /
    ``ema_prediction`` / ``direction`` ``[N, ...]`` (``direction`` +d on a winner's row, −d on a loser's), ``alphas_t``
    ``[N]`` ᾱ at the rows' timesteps."""
    c_t = (1 - alphas_t.to(prediction.dtype)).sqrt().view(-1, *([1] * (prediction.dim() - 1)))
    target = (ema_prediction - grad_scale * c_t * direction).detach()
    return -((prediction - target) ** 2).flatten(1).mean(1)


class SPO(DiffusionMethod):
    """Online step-wise DPO on candidate next latents that share x_t, from a branching sampler."""

    name = "spo"
    taxonomy = {"data.feedback": "pair", "data.granularity": "step", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Step-aware Preference Optimization: Aligning Preference with Denoising Performance at Each Step",
                  "2406.04314", code="RockeyCoss/SPO")  # fmt: skip
    summary = "online DPO on best/worst of k candidate next latents from one x_t per step (branching sampler)"
    needs = Needs(reference="yes", precomputable_reference=False, rollout=Rollout(n=1, decoding=SPO_DECODING))
    Config = SPOConfig
    scoring = Scoring(targets=("epsilon",), source="transitions")
    data_fields = ("prompt",)
    image_fields = ()
    record = True
    example_data = {"path": "recipes/data/online_prompts.jsonl"}
    #: ``trl-plus show``'s example rollout: a latent scorer on a logit-like scale and a short sampler (branching
    #: from step 4 of 6) for the tiny model.
    example_rollout = {"decoding": {"steps": 6}, "scorers": [{"name": "latent-mean", "weight": 20.0}]}

    def candidate_scores(self, trainer: Any, prompt_ids, candidates, x0_hat, step: int):
        """``[N]`` the preference score of each candidate next latent (rows ``prompt_ids``) at sampler step
        ``step``: the fallback for the paper's step-aware model — the run's scorers' weighted reward of the
        candidate's predicted x̂0 (``candidate_view: predicted_x0``; the final image at the last step) or of the
        candidate latent (``latent``). Override for a time-conditioned scorer."""
        view = candidates if self.config.candidate_view == "latent" or x0_hat is None else x0_hat
        prompts = trainer.prompt_texts(prompt_ids)
        scores, weights, _, _ = trainer.score_images(prompts, view.float().cpu())
        return (scores * weights).nansum(-1)

    def rollout(self, trainer: Any, prompt_ids) -> ImageRollouts:
        """SPO's step-wise resampler for the text-cache rows ``prompt_ids`` ``[Q]``: one chain per prompt, branching
        into k candidates from step ``divert_start_step`` on; returns the chains' final images (scored by the run's
        scorers) with each prompt's kept pairs in ``columns["spo_pairs"]`` (``{"x_t", "x_prev" [2, ...] winner
        first, "timestep", "prev_timestep" [2]}``; GradSPO adds ``"direction"`` [2, ...] = (d, −d) with
        d = (z_best − z_worst)/2 of the candidates' unit noises). GradSPO samples with the EMA copy of the policy
        swapped in (``trainer.parameter_state("ema")``)."""
        if self.config.variant == "gradspo":
            with trainer.parameter_state(EMA).applied(trainer.policy()):
                return self._branching_rollout(trainer, prompt_ids)
        return self._branching_rollout(trainer, prompt_ids)

    def _branching_rollout(self, trainer: Any, prompt_ids) -> ImageRollouts:
        import torch

        from trl_plus import ddim_sigma, ddim_step_mean, predicted_x0, sampling_timesteps  # torch-backed: when sampling

        config, settings = self.config, trainer.sampling
        steps, eta, k = settings["steps"], settings["eta"], config.num_sample_each_step
        if config.divert_start_step >= steps:
            raise TrlPlusError(f"spo: method_args.divert_start_step ({config.divert_start_step}) must be below "
                               f"rollout.decoding.steps ({steps}): no step would branch")  # fmt: skip
        scheduler = trainer.bundle.scheduler
        generator = trainer.rollout_generator()
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        q = len(ids)
        x = trainer.initial_noise(q, generator)
        if config.divert_start_step > 0:  # the single chain
            x = trainer.sample_images(ids, x, generator=generator, stop=config.divert_start_step).latents[-1].cpu()
        timesteps, prev_timesteps = sampling_timesteps(scheduler, steps)
        pairs: list[list[dict]] = [[] for _ in range(q)]
        gradspo = config.variant == "gradspo"
        kept = considered = 0
        prediction = None
        for j in range(config.divert_start_step, steps):
            t, prev = timesteps[j].expand(q), prev_timesteps[j].expand(q)
            if prediction is None:  # the chain's guided prediction at x_t (afterwards: the chosen candidate's)
                prediction = trainer.sample_images(ids, x, generator=generator, start=j, stop=j + 1,
                                                   record=True).predictions[0].cpu()  # fmt: skip
            mean = ddim_step_mean(scheduler, x, prediction, t, prev, eta)
            std = ddim_sigma(scheduler, t, prev, eta, x.device).view(-1, *([1] * (x.dim() - 1)))
            noise = torch.randn((k, *x.shape), generator=generator)
            candidates = (mean.unsqueeze(0) + std.unsqueeze(0) * noise).transpose(0, 1).reshape(q * k, *x.shape[1:])
            rows = ids.repeat_interleave(k)
            next_prediction = x0_hat = None
            if j + 1 < steps:  # each candidate's prediction at the next step: its x̂0 (and the chain's next ε̂)
                next_prediction = trainer.sample_images(rows, candidates, generator=generator, start=j + 1,
                                                        stop=j + 2, record=True).predictions[0].cpu()  # fmt: skip
                x0_hat = predicted_x0(scheduler, candidates, next_prediction, timesteps[j + 1].expand(q * k))
            scores = self.candidate_scores(trainer, rows, candidates, x0_hat, j).view(q, k).T  # [k, Q]
            indices, valid = preference_compare(scores, config.threshold)
            considered += q
            grid = candidates.view(q, k, *x.shape[1:])
            if bool((std > 0).all()):  # a σ = 0 step (the final one, where the final ᾱ is 1) has no density
                for g in valid.nonzero().flatten().tolist():
                    best, worst = int(indices[0, g]), int(indices[1, g])
                    pair = {"x_t": torch.stack([x[g], x[g]]),
                            "x_prev": torch.stack([grid[g, best], grid[g, worst]]),
                            "timestep": torch.stack([t[g], t[g]]), "prev_timestep": torch.stack([prev[g], prev[g]])}
                    if gradspo:  # the official win_noise / lose_noise: ±(z_max − z_min)/2
                        d = (noise[best, g] - noise[worst, g]) / 2
                        pair["direction"] = torch.stack([d, -d])
                    pairs[g].append(pair)
                    kept += 1
            choice = torch.randint(k, (q,), generator=generator)
            x = grid[torch.arange(q), choice]
            if next_prediction is not None:
                prediction = next_prediction.view(q, k, *x.shape[1:])[torch.arange(q), choice]
        prompts = trainer.prompt_texts(ids)
        scores, weights, names, images = trainer.score_images(prompts, x)
        return ImageRollouts(prompts=prompts, prompt_ids=ids, group=torch.arange(q), latents=x, scores=scores,
                             weights=weights, score_names=names, images=images,
                             columns={PAIRS: pairs, "spo_kept_share": [kept / max(1, considered)] * q})  # fmt: skip

    def make_examples(self, rollouts: ImageRollouts) -> list[dict[str, Any]]:
        """One transition row per kept pair (winner first) of every prompt of the stage."""
        if PAIRS not in rollouts.columns:
            raise TrlPlusError("spo: the rollout carries no spo_pairs column; sample with SPO.rollout (the step-wise "
                               "branching sampler)")  # fmt: skip
        return [{"prompt_id": int(rollouts.prompt_ids[g]), "transition": pair}
                for g, prompt_pairs in enumerate(rollouts.columns[PAIRS]) for pair in prompt_pairs]  # fmt: skip

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """GradSPO's rows (``variant: gradspo``; SPO: ``None``, the core's step log-densities): ℓ ``[2·B, 1]`` =
        s(+) on the winners' rows, s(−) on the losers' (:func:`gradspo_scores`), ε_θ with grad, ε_ref and ε_ema
        without, each classifier-free guided as the sampler; the pair's shared x_t is predicted once."""
        if self.config.variant != "gradspo":
            return None
        import torch

        from trl_plus import Noised, ScoreOutput

        if "transition_direction" not in inputs:
            raise TrlPlusError("spo: variant gradspo needs rows with the noise direction (transition.direction): "
                               "sample them with SPO.rollout under method_args.variant: gradspo")  # fmt: skip
        x_t, t = inputs["transition_x_t"].float(), inputs["transition_timestep"].long()
        direction = inputs["transition_direction"].float()
        group, prompt_ids = inputs["group"], inputs["prompt_ids"]
        b = prompt_ids.size(0)
        shared = x_t.size(0) == 2 * b and torch.equal(x_t[:b], x_t[b:]) and torch.equal(t[:b], t[b:])
        rows = slice(0, b) if shared else slice(None)

        def predict(denoiser):
            output = trainer.sampler_prediction(denoiser, x_t[rows], t[rows], prompt_ids, group[rows])
            return output.repeat(2, *([1] * (output.dim() - 1))) if shared else output

        # the EMA and the reference first: swapping the EMA's tensors in place must precede the policy's graph
        with torch.no_grad(), trainer.parameter_state(EMA).applied(trainer.policy()) as ema:
            ema_prediction = predict(ema)
        alphas = trainer.bundle.scheduler.alphas_cumprod.to(x_t.device)[t]
        g = self.config.grad_scale
        ref_logps = None
        if trainer.reference_mode != "none":
            with torch.no_grad(), trainer.reference_denoiser() as reference:
                ref_logps = gradspo_scores(predict(reference), ema_prediction, direction, alphas, g)
        logps = gradspo_scores(predict(model), ema_prediction, direction, alphas, g)
        c_t = (1 - alphas).sqrt().view(-1, *([1] * (x_t.dim() - 1)))
        noised = Noised(x_t=x_t, timesteps=t, target=ema_prediction - g * c_t * direction,
                        weight=torch.ones_like(logps.detach()), noise=direction, t=t)  # fmt: skip
        return ScoreOutput(logps.unsqueeze(-1), torch.ones_like(logps.detach()).unsqueeze(-1),
                           None if ref_logps is None else ref_logps.unsqueeze(-1), -logps.detach(),
                           None if ref_logps is None else -ref_logps, noised)  # fmt: skip

    def step_end(self, trainer: Any) -> None:
        """GradSPO: the sampling EMA ← decay·EMA + (1 − decay)·θ after every optimizer step (the official
        ``update_ema``); SPO: nothing."""
        if self.config.variant == "gradspo":
            trainer.parameter_state(EMA).update(trainer.policy(), decay=self.config.ema_decay)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The clipped step-wise DPO loss, mean over the kept pairs (winner index 0)."""
        if ctx.ref_token_logps is None:
            raise TrlPlusError("spo needs the reference's step log-densities: set reference.mode to auto, adapter "
                               "or model (not none)")  # fmt: skip
        logps, ref_logps = ctx.logps(), ctx.ref_logps()
        losses, log_ratios = spo_losses(logps, ref_logps, self.config.beta, self.config.eps)
        ratios = (logps - ref_logps).detach().exp()
        clipped = (ratios < 1 - self.config.eps) | (ratios > 1 + self.config.eps)
        return LossOutput(losses.mean(), rewards=self.config.beta * log_ratios.detach(),
                          metrics={"spo/clipped": clipped.float().mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    register(SPO)
