"""Flow-NRG — Noisy Reward Guidance for rectified-flow sampling (Improving Video Generation with Human Feedback,
arXiv 2501.13918; no official code for this part). Inference only: the frozen generator's velocity is shifted at
every Euler step by the gradient of a time-conditioned latent reward, one user weight per objective:

    ṽ(x_t, σ, c) = v_θ(x_t, σ, c) − (σ / (1 − σ)) · ∇_{x_t} Σ_k w_k r_k(x_t, σ, c),   x_{σ'} = x_σ + (σ' − σ)·ṽ

(diffusers' flow convention: σ = 1 is noise; σ/(1 − σ) capped at ``max_factor``). Only the reward is differentiated
(to the latent): no VAE decode, no generator backward. ``guided_generate`` samples a pipeline folder / alias or a
built :class:`~trl_plus.DiffusionTrainer` with it and writes PNGs; ``trl-plus flow-nrg generate RECIPE`` (or
``python -m trl_plus_flow_nrg RECIPE``) runs it from a recipe. The method ``flow-nrg`` is registered so that recipes name it; it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
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

#: The one line every training entry point answers with.
TRAINS_NOTHING = ("flow-nrg trains nothing; generate with trl-plus flow-nrg generate RECIPE "
                  "(or trl_plus_flow_nrg.guided_generate)")  # fmt: skip


class FlowNRGConfig(MethodConfig):
    """Flow-NRG settings: the cap on the guidance factor σ/(1 − σ) (the weights w_k are the scorers' weights)."""

    max_factor: float = Field(100.0, gt=0, description="cap on σ/(1 − σ), which diverges at σ → 1 (inferred)")


class FlowNRG(DiffusionMethod):
    """Reward-guided flow sampling (inference only): the recipe's ``rollout`` gives the sampler settings and the
    latent scorers with their weights; training is refused in one line."""

    name = "flow-nrg"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "online", "constraint.reference": "reference-free",
                "learning.objective": ("multi-objective",), "property": (), "scope": "video",
                "source": "inferred"}  # fmt: skip
    family = "flow"
    paper = Paper("Improving Video Generation with Human Feedback", "2501.13918")
    summary = "inference-time reward guidance for flow models: ṽ = v − σ/(1−σ)·Σ_k w_k ∇r_k (trains nothing)"
    needs = Needs(reference="no", precomputable_reference=False,
                  rollout=Rollout(n=1, decoding={"steps": 28, "eta": 0.0, "guidance": 1.0}))  # fmt: skip
    Config = FlowNRGConfig
    scoring = Scoring(targets=("flow",))
    data_fields = ("prompt",)
    image_fields = ()
    example_data = {"path": "recipes/data/diffusion_prompts.jsonl"}
    example_model = {"kind": "diffusion", "name_or_path": "tiny-sd3"}

    example_rollout = {"n": 1, "decoding": {"steps": 4, "eta": 0.0, "guidance": 1.0},
                       "scorers": [{"name": "latent-mean", "weight": 1.0}]}  # fmt: skip

    #: ``trl-plus train`` refuses a flow-nrg recipe with this, after the prompts' checks, before any model loads.
    inference_only = "generate with trl-plus flow-nrg generate RECIPE (or trl_plus_flow_nrg.guided_generate)"

    def make_examples(self, rollouts: Any) -> list[dict[str, Any]]:
        """Refused: a DiffusionTrainer built on flow-nrg samples, it does not train."""
        raise TrlPlusError(TRAINS_NOTHING)

    def loss(self, ctx: LossContext) -> LossOutput:
        """Refused (no generator loss)."""
        raise TrlPlusError(TRAINS_NOTHING)


# -- the guidance ---------------------------------------------------------------------------------------------------
def _scorer(spec: Any) -> Any:
    """A scorer instance from an instance or a registered name."""
    if isinstance(spec, str):
        from trl_plus import get_registry

        cls = get_registry().get_scorer(spec)
        return cls(cls.Config())
    return spec


def checked_scorers(scorers: Any) -> list[tuple[Any, list[float]]]:
    """``[(scorer, per-output weights)]`` from ``[(scorer or name, weight)]``, each scorer reading latents (one-line
    errors: no scorer; a scorer that reads pixels or text cannot give a latent gradient)."""
    if not scorers:
        raise TrlPlusError("scorers: reward guidance needs at least one latent scorer with its weight, e.g. "
                           "[('latent-mean', 1.0)]")  # fmt: skip
    checked = []
    for i, item in enumerate(scorers):
        spec, weight = item if isinstance(item, (tuple, list)) else (item, 1.0)
        scorer = _scorer(spec)
        if getattr(scorer, "inputs", "text") != "latents":
            raise TrlPlusError(f"scorers.{i}: {scorer.name} reads {scorer.inputs}, but latent guidance differentiates "
                               "a reward of the noisy latents: use a latent scorer (inputs: latents, e.g. latent-mean)")
        checked.append((scorer, scorer.output_weights(weight)))
    return checked


def latent_reward(scorers: Any, prompts: list[str]):
    """``reward(x [N, ...], sigma [N]) -> [N]``: Σ_k w_k r_k(x, σ) over the scorers (a vector scorer's outputs each
    weighted), differentiable in ``x``; a scorer with a ``sigma`` column receives the noise level."""
    import torch

    checked = checked_scorers(scorers)

    def reward(x, sigma):
        total = x.new_zeros(x.size(0))
        for scorer, weights in checked:
            columns = {"sigma": sigma} if "sigma" in scorer.columns else {}
            value = scorer.score(list(prompts), x, **columns)
            value = value.unsqueeze(-1) if value.dim() == 1 else value
            if not value.requires_grad:
                raise TrlPlusError(f"scorers: {scorer.name} is not differentiable in the latents (its scores carry "
                                   "no gradient); latent guidance needs a differentiable latent reward")  # fmt: skip
            total = total + (value.to(x.dtype) * torch.tensor(weights, dtype=x.dtype, device=x.device)).sum(-1)
        return total

    return reward


def guidance_fn(scorers: Any, prompts: list[str], max_factor: float = 100.0):
    """The sampler's ``guidance_fn`` (:func:`trl_plus.reward_guidance`) for the weighted latent scorers; all weights
    0: the plain sampler's predictions, exactly."""
    from trl_plus import reward_guidance

    checked = checked_scorers(scorers)
    zero = all(w == 0 for _, weights in checked for w in weights)
    return reward_guidance(latent_reward(checked_pairs(checked), prompts), 0.0 if zero else 1.0,
                           max_factor=max_factor)  # fmt: skip


def checked_pairs(checked: list[tuple[Any, list[float]]]) -> list[tuple[Any, Any]]:
    """Checked scorers back in the ``[(scorer, weight)]`` form (per-output weights kept as lists)."""
    return [(scorer, weights if len(weights) > 1 else weights[0]) for scorer, weights in checked]


# -- generation -----------------------------------------------------------------------------------------------------
@dataclass
class GuidedSamples:
    """What :func:`guided_generate` made: per row (prompt-major, ``n`` per prompt) the prompt, the final latents
    ``[N, ...]``, the decoded images ``[N, C, H, W]`` in [0, 1], each scorer's score of the final latents
    (``rewards[name]`` ``[N]``, unweighted) and the PNG paths written (empty without ``out_dir``)."""

    prompts: list[str]
    latents: Any
    images: Any
    rewards: dict[str, Any] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    def reward(self, weights: dict[str, float] | None = None) -> Any:
        """``[N]`` the sum of the rewards (weighted by ``weights[name]`` when given)."""
        names = list(self.rewards)
        return sum((weights or {}).get(name, 1.0) * self.rewards[name] for name in names)


def _trainer_for(source: str, prompts: list[str], scorers, settings: dict[str, Any], resolution, dtype, max_factor):
    from trl_plus import DiffusionTrainer, Recipe

    model = {"kind": "diffusion", "name_or_path": source, "resolution": resolution}
    if dtype is not None:
        model.update({"dtype": dtype, "text_encoders": {"dtype": dtype}})
    recipe = Recipe.model_validate({"method": FlowNRG.name, "model": model, "data": {"train": {"path": "prompts"}}})
    method = FlowNRG(FlowNRGConfig(max_factor=max_factor))
    rollout = Rollout(n=1, decoding=dict(settings))
    training = {"output_dir": tempfile.mkdtemp(prefix="flow-nrg-"), "disable_tqdm": True}
    return DiffusionTrainer.from_recipe(recipe, method, training, [{"prompt": p} for p in dict.fromkeys(prompts)],
                                        rollout=rollout, scorers=tuple(checked_pairs(scorers)))  # fmt: skip


def guided_generate(source: Any, prompts: list[str], scorers: Any, *, steps: int = 28, seed: int = 0, n: int = 1,
                    guidance: float = 1.0, max_factor: float = 100.0, out_dir: str | Path | None = None,
                    resolution: int | None = None, dtype: str | None = None) -> GuidedSamples:  # fmt: skip
    """Sample ``n`` images per prompt with multi-objective latent reward guidance (Σ_k w_k ∇r_k, see the module doc)
    and, with ``out_dir``, write them as ``NNNN.png`` plus ``samples.jsonl`` (prompt, image, rewards).

    ``source``: a diffusers pipeline folder or alias (``tiny-sd3``; loaded frozen, ``resolution`` / ``dtype`` as a
    recipe's ``model`` block) or a built :class:`~trl_plus.DiffusionTrainer` whose text cache holds ``prompts``;
    ``scorers``: ``[(scorer or registered name, weight)]`` of latent scorers (weights 0: plain sampling);
    ``steps``: Euler steps; ``guidance``: classifier-free guidance scale (1: off); ``seed``: x_T per row from one
    generator — the same seed gives the same starts whatever the weights."""
    import torch

    from trl_plus import sample

    checked = checked_scorers(scorers)
    if not prompts:
        raise TrlPlusError("prompts: give at least one prompt to generate from")
    settings = {"steps": int(steps), "eta": 0.0, "guidance": float(guidance)}
    trainer = source if hasattr(source, "text_cache") else _trainer_for(str(source), prompts, checked, settings,
                                                                        resolution, dtype, max_factor)  # fmt: skip
    if trainer.scorer.target != "flow":
        raise TrlPlusError(f"source: flow-nrg guides flow models; {type(trainer.bundle.scheduler).__name__} predicts "
                           f"{trainer.scorer.target} (use a flow-matching pipeline, e.g. tiny-sd3)")  # fmt: skip
    known = trainer.text_cache["text"].size(0)
    ids = [trainer.prompt_id(p) for p in prompts]
    if any(i >= known for i in ids):
        missing = prompts[next(j for j, i in enumerate(ids) if i >= known)]
        raise TrlPlusError(f"prompts: {missing!r} is not in the trainer's text cache (build the trainer with it as a "
                           "row, or pass a pipeline folder / alias as the source)")  # fmt: skip
    rows = torch.tensor(ids, dtype=torch.long).repeat_interleave(n)
    texts = [p for p in prompts for _ in range(n)]
    model = trainer.policy()
    dtype_ = trainer.denoiser_dtype(model)
    device = trainer.args.device
    x_T = trainer.initial_noise(len(rows), torch.Generator().manual_seed(seed))
    cond = trainer.cond(rows, dtype_, device)
    uncond = trainer.uncond(len(rows), dtype_, device) if guidance != 1 else None
    was_training = model.training
    model.eval()
    try:
        trajectory = sample(model, trainer.bundle.scheduler, x_T.to(device), cond, settings["steps"], eta=0.0,
                            guidance=settings["guidance"], uncond=uncond, record=False,
                            guidance_fn=guidance_fn(checked_pairs(checked), texts, max_factor))  # fmt: skip
    finally:
        model.train(was_training)
    latents = trajectory.latents[-1].detach().cpu()
    with torch.no_grad():
        rewards = {}
        for scorer, _ in checked:
            columns = {"sigma": torch.zeros(len(rows))} if "sigma" in scorer.columns else {}
            value = scorer.checked_scores(texts, latents, **columns)
            for j, output in enumerate(scorer.outputs):
                rewards[f"{scorer.name}/{output}" if len(scorer.outputs) > 1 else scorer.name] = value[:, j]
        images = trainer.decode(latents).cpu()
    paths = write_images(images, out_dir, texts, rewards) if out_dir is not None else []
    return GuidedSamples(texts, latents, images, rewards, paths)


# -- files ----------------------------------------------------------------------------------------------------------
def write_images(images: Any, out_dir: str | Path, prompts: list[str], rewards: dict[str, Any]) -> list[str]:
    """``out_dir/NNNN.png`` per image and ``out_dir/samples.jsonl`` (prompt, image, the rewards); the paths."""
    from trl_plus import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i, image in enumerate(images):
        path = out / f"{i:04d}.png"
        paths.append(save_image(image, path))
        lines.append(json.dumps({"prompt": prompts[i], "image": path.name,
                                 **{k: float(v[i]) for k, v in rewards.items()}}))  # fmt: skip
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in lines))
    return paths


# -- from a recipe ----------------------------------------------------------------------------------------------------
def generate_from_recipe(recipe_path: str, prompts: list[str] | None = None, out_dir: str | None = None,
                         seed: int = 0, overrides: list[str] | None = None) -> GuidedSamples:  # fmt: skip
    """:func:`guided_generate` as a ``flow-nrg`` recipe says: ``model`` (the pipeline), ``rollout.n`` /
    ``rollout.decoding`` (``steps``, ``guidance``), ``rollout.scorers`` (names, args, weights), ``method_args.max_factor``;
    prompts from ``prompts`` or the ``data.train`` jsonl's ``prompt`` column; PNGs to ``out_dir`` (default
    ``training.output_dir``)."""
    from trl_plus import get_registry, load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    if recipe.method != FlowNRG.name:
        raise TrlPlusError(f"{recipe_path}: method: {recipe.method!r}; this command runs flow-nrg recipes")
    config = FlowNRGConfig(**recipe.method_args)
    spec = recipe.rollout
    if spec is None or not spec.scorers:
        raise TrlPlusError(f"{recipe_path}: rollout.scorers: reward guidance needs a latent scorer, e.g. "
                           "[{name: latent-mean, weight: 1.0}]")  # fmt: skip
    scorers = []
    for item in spec.scorers:
        cls = get_registry().get_scorer(item.name)
        scorers.append((cls(cls.Config(**item.args)), item.weight))
    if not prompts:
        path = Path(recipe.data.train.path)
        if not path.is_file():
            raise TrlPlusError(f"{recipe_path}: data.train.path: {path} is not a file of prompt rows; give --prompt")
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    decoding = {**FlowNRG.needs.rollout.decoding, **spec.decoding}
    return guided_generate(recipe.model.name_or_path, prompts, scorers, steps=decoding["steps"], seed=seed,
                           n=spec.n or 1, guidance=decoding.get("guidance", 1.0), max_factor=config.max_factor,
                           out_dir=out_dir or recipe.training.get("output_dir") or "runs/flow-nrg",
                           resolution=recipe.model.resolution, dtype=recipe.model.dtype)  # fmt: skip


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a flow-nrg recipe (model, rollout.decoding, rollout.scorers, data.train)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: data.train)")
    parser.add_argument("--out", help="the folder for the PNGs (default: training.output_dir)")
    parser.add_argument("--seed", type=int, default=0, help="the starts' seed")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")


def _run(args: argparse.Namespace) -> int:
    done = generate_from_recipe(args.recipe, args.prompt, args.out, args.seed, args.overrides)
    for name, values in done.rewards.items():
        print(f"{name}: mean {float(values.mean()):.6f} over {len(values)} images")
    print(f"wrote {len(done.paths)} images to {Path(done.paths[0]).parent if done.paths else '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trl_plus_flow_nrg RECIPE [--prompt P ...] [--out DIR] [--seed S] [--set key=value ...]`` (the
    same as ``trl-plus flow-nrg generate``)."""
    parser = argparse.ArgumentParser(prog="python -m trl_plus_flow_nrg", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except TrlPlusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@hookimpl
def register_commands(register):
    """``trl-plus flow-nrg generate``."""
    register("flow-nrg generate", "reward-guided samples of a flow pipeline as a flow-nrg recipe says (PNGs)",
             _add_arguments, _run)  # fmt: skip


@hookimpl
def register_methods(register):
    register(FlowNRG)


if __name__ == "__main__":
    raise SystemExit(main())
