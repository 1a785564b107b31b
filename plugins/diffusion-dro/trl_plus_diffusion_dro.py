"""Diffusion-DRO — Diffusion Denoising Ranking Optimization, from "Ranking-based Preference Optimization for Diffusion
Models from Implicit User Feedback" (arXiv 2510.18353, NeurIPS 2025; official code basiclab/DiffusionDRO ``train.py``,
``misc/buffer.py``).

Rows are ``{prompt, image}``: an offline expert image per prompt. Online, a lagged copy of the policy (the
*sampler*, refreshed every ``buffer_update_steps`` optimizer steps) samples each prompt and pushes its trajectory —
per step the latent x_t, the timestep t and the sampler's own noise prediction ε̂(x_t) — with the prompt and its
expert latent x0 into a replay buffer of ``buffer_size`` trajectories. Training draws (trajectory, step) pairs from
the buffer; the expert is forward-noised at the same t with fresh noise ε^E. With e the element-mean squared error:

    diff = (e_θ(x_t^E; ε^E) − e_ref(x_t^E; ε^E)) − (e_θ(x_t^π; ε̂) − e_ref(x_t^π; ε̂))
    L    = mean over rows of max(diff + m, 0),   m = 0.001

Zero once the policy improves on the expert by m more than on its own samples (both relative to the reference).
"""

from __future__ import annotations

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
    denoising_errors,
    hookimpl,
)


class DiffusionDROConfig(MethodConfig):
    """Diffusion-DRO hyperparameters (defaults: the official ``train.py``)."""

    margin: float = Field(0.001, ge=0, description="m of the hinge max(diff + m, 0) (official --margin 0.001)")
    buffer_size: int = Field(4, ge=1, description="trajectories kept in the replay buffer (official --buffer_size 4)")
    buffer_update_steps: int = Field(
        16, ge=1, description="copy the policy into the sampler every N optimizer steps (official 16)")
    image_column: str = Field("image", description="the data column holding each prompt's expert image")


def hinge_loss(errors, ref_errors, margin: float):
    """``(loss, diff)`` of the Diffusion-DRO hinge from ``[2, B]`` policy and reference errors (row 0: the expert
    branch, row 1: the replayed policy sample): diff = (e_θ^E − e_ref^E) − (e_θ^π − e_ref^π),
    loss = mean(max(diff + m, 0))."""
    import torch

    diff = (errors[0] - ref_errors[0]) - (errors[1] - ref_errors[1])
    return torch.clamp(diff + margin, min=0).mean(), diff


class ReplayBuffer:
    """The official ``ReplayBuffer``: the last ``size`` trajectories (CPU), each with its prompt's text-cache row, its
    expert latent (a tensor or a VAE latent distribution ``{"mean", "std"}``) and per sampled step the latent x_t the
    sampler saw, the timestep and the sampler's prediction ε̂ at that latent."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.items)

    def push(self, prompt_id: int, expert: Any, latents, timesteps, predictions) -> None:
        """Add one trajectory (``latents`` ``[S, ...]`` the inputs of its S steps, ``timesteps`` ``[S]``,
        ``predictions`` ``[S, ...]``) and drop the oldest beyond ``size``."""
        self.items.append({"prompt_id": int(prompt_id), "expert": expert, "x_t": latents.detach().float().cpu(),
                           "timesteps": timesteps.detach().long().cpu(), "eps": predictions.detach().float().cpu()})
        del self.items[:-self.size]

    def sample(self, n: int, generator=None) -> list[dict[str, Any]]:
        """``n`` (trajectory, step) draws, as the official ``sample``: trajectories without replacement when
        ``n`` <= the buffer's size (else with), one uniform step each."""
        import torch

        count = len(self.items)
        if count == 0:
            raise TrlPlusError("diffusion-dro: the replay buffer is empty; push a trajectory before sampling")
        picks = torch.randperm(count, generator=generator)[:n] if n <= count else torch.randint(
            0, count, (n,), generator=generator)  # fmt: skip
        rows = []
        for i in picks.tolist():
            item = self.items[i]
            j = int(torch.randint(0, item["timesteps"].numel(), (1,), generator=generator))
            rows.append({"prompt_id": item["prompt_id"], "x0": item["expert"], "policy_x_t": item["x_t"][j],
                         "policy_eps": item["eps"][j], "timestep": int(item["timesteps"][j])})  # fmt: skip
        return rows


class BufferRowsCollator:
    """Buffer rows -> a batch: the expert latents as the core's latent collator stacks them (``x0``, K = 1), the
    replayed ``policy_x_t`` / ``policy_eps`` ``[B, ...]`` and ``timestep`` ``[B]``; ``num_sequences`` 2 (expert, policy)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from trl_plus import LatentCollator

        batch = LatentCollator()(rows)
        size = len(rows)
        batch["policy_x_t"] = torch.stack([r["policy_x_t"] for r in rows])
        batch["policy_eps"] = torch.stack([r["policy_eps"] for r in rows])
        batch["timestep"] = torch.tensor([r["timestep"] for r in rows], dtype=torch.long)
        batch["group"] = torch.arange(size).repeat(2)
        batch["num_sequences"] = 2
        return batch


class DiffusionDRO(DiffusionMethod):
    """Hinge ranking of offline expert images over the lagged policy's own replayed samples (online, ε-prediction)."""

    name = "diffusion-dro"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "online", "constraint.reference": "fixed",
                "learning.objective": ("self-play",), "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Ranking-based Preference Optimization for Diffusion Models from Implicit User Feedback",
                  "2510.18353", code="basiclab/DiffusionDRO")  # fmt: skip
    summary = "hinge max(diff + m, 0): expert images ≻ replayed samples of a lagged sampler, relative to the reference"
    needs = Needs(reference="yes", precomputable_reference=False,
                  rollout=Rollout(n=1, decoding={"steps": 20, "eta": 0.0, "guidance": 1.0}))  # fmt: skip
    Config = DiffusionDROConfig
    scoring = Scoring(targets=("epsilon",))
    data_fields = ("prompt", "image")
    image_fields = ("image",)
    sequences_per_example = 2
    record = True
    example_data = {"path": "recipes/data/diffusion_experts.jsonl"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer = ReplayBuffer(self.config.buffer_size)
        self._experts: dict[str, Any] = {}

    # -- data -----------------------------------------------------------------------------------------------------
    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """Prompt rows (the core's check) whose expert image column names an existing file, made absolute (relative
        paths are read from the data file's folder)."""
        dataset = super().prepare_split(dataset, recipe, split)
        column = self.config.image_column
        spec = getattr(recipe.data, split)
        if column not in dataset.column_names:
            raise TrlPlusError(f"data.{split} ({spec.path}): diffusion-dro needs an expert image per prompt in column "
                               f"{column!r} (method_args.image_column); columns: {', '.join(dataset.column_names)}")
        base = Path(spec.path).expanduser().resolve().parent if Path(spec.path).is_file() else Path.cwd()

        def resolve(row):
            value = row[column]
            path = Path(str(value)).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise TrlPlusError(f"data.{split} ({spec.path}): {column!r} {value!r} is not a file")
            return {column: str(path)}

        return dataset.map(resolve)

    def expert(self, trainer: Any, value: Any) -> Any:
        """The expert latent of one row's image column: a ready tensor ``[C, h, w]`` (tests, cached latents) as
        ``[1, C, h, w]``, or a path encoded once by the trainer's VAE (``encode_images``: its latent distribution,
        sampled at every training step as the official ``latent_dist.sample()``)."""
        if not isinstance(value, str):
            import torch

            return torch.as_tensor(value).float().unsqueeze(0)
        if value not in self._experts:
            self._experts[value] = trainer.encode_images([value])
        return self._experts[value]

    # -- online stage ---------------------------------------------------------------------------------------------
    def rollout(self, trainer: Any, prompt_ids: Any):
        """The lagged sampler's trajectories (recorded) of the micro-batch's prompts, pushed with their prompts'
        experts into the replay buffer; then as many (trajectory, step) rows drawn from the buffer as the stage has
        prompts, carried to :meth:`make_examples` as ``columns["dro_rows"]``. Each prompt is dropped to the empty one
        with probability ``training.caption_dropout`` before sampling, as the official script encodes the dropped
        prompt once for both the buffer sampler and the training step."""
        import torch

        generator = trainer.rollout_generator(offset=1)
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).clone()
        if trainer.args.caption_dropout > 0:
            drop = torch.rand(ids.shape, generator=generator) < trainer.args.caption_dropout
            ids = torch.where(drop, torch.zeros_like(ids), ids)
        policy = trainer.policy()
        with trainer.parameter_state("sampler").applied(policy):
            rollouts = trainer.sample_rollouts(ids, n=1, record=True, model=policy)
        column = self.config.image_column
        experts = rollouts.columns.get(column)
        if experts is None:
            raise TrlPlusError(f"diffusion-dro: the prompt rows carry no {column!r} column (each prompt's expert image)")
        trajectory = rollouts.trajectory
        for i in range(len(rollouts.prompts)):
            self.buffer.push(int(rollouts.prompt_ids[i]), self.expert(trainer, experts[i]),
                             trajectory.latents[:-1, i], trajectory.timesteps, trajectory.predictions[:, i])
        rollouts.columns["dro_rows"] = self.buffer.sample(len(rollouts.prompts), trainer.rollout_generator(offset=2))
        return rollouts

    def make_examples(self, rollouts: Any) -> list[dict[str, Any]]:
        """The rows :meth:`rollout` drew from the replay buffer."""
        if "dro_rows" not in rollouts.columns:
            raise TrlPlusError("diffusion-dro: make_examples takes the rows of the method's own rollout (it fills the "
                               "replay buffer and draws from it)")  # fmt: skip
        return rollouts.columns["dro_rows"]

    def state_dict(self) -> dict[str, Any]:
        """The replay buffer's trajectories, saved in every checkpoint (a resumed run replays the same samples)."""
        return {"buffer": list(self.buffer.items)} if self.buffer.items else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the replay buffer of a checkpoint."""
        self.buffer.items = list(state.get("buffer", []))[-self.buffer.size:]

    def step_end(self, trainer: Any) -> None:
        """Copy the policy into the sampler every ``buffer_update_steps`` optimizer steps (official: ``step %
        buffer_update_steps == 0``)."""
        if trainer.state.global_step % self.config.buffer_update_steps == 0:
            trainer.parameter_state("sampler").update(trainer.policy(), decay=0)

    def batch_collator(self) -> Any:
        """:class:`BufferRowsCollator`."""
        return BufferRowsCollator()

    # -- scoring and loss -----------------------------------------------------------------------------------------
    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """Rows ``[expert B, policy B]``: the expert x0 forward-noised at the replayed t with fresh ε^E (target ε^E),
        the replayed x_t^π (target ε̂ of the sampler); the policy's errors with grad, the reference's without."""
        import torch

        from trl_plus import Noised

        b = inputs["prompt_ids"].size(0)
        x0 = trainer.clean_latents({**inputs, "group": inputs["group"][:b]}, generator)
        device = x0.device
        t = inputs["timestep"].to(device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
        x_expert = trainer.bundle.scheduler.add_noise(x0.float(), noise, t)
        x_t = torch.cat([x_expert, inputs["policy_x_t"].to(device).float()])
        target = torch.cat([noise, inputs["policy_eps"].to(device).float()])
        steps = torch.cat([t, t])
        dtype = trainer.denoiser_dtype(model)
        cond = trainer.conditioning(inputs["prompt_ids"], inputs["group"], dtype, device)
        noised = Noised(x_t=x_t.to(dtype), timesteps=steps, target=target, weight=torch.full((2 * b,), 0.5),
                        noise=target, t=steps)  # fmt: skip
        reference = None if trainer.reference_mode == "none" else trainer.reference_errors
        return trainer.scorer.score_noised(model, noised, cond, reference)

    def loss(self, ctx: LossContext) -> LossOutput:
        """mean(max(diff + m, 0)); logs diff, the active share and the four errors."""
        errors, ref_errors = denoising_errors(ctx)
        if ref_errors is None:
            raise TrlPlusError("diffusion-dro needs the reference's errors (reference.mode: auto, model or adapter)")
        loss, diff = hinge_loss(errors, ref_errors, self.config.margin)
        e, r = errors.detach(), ref_errors.detach()
        return LossOutput(loss, metrics={
            "dro/diff": diff.detach().mean(), "dro/active": (diff.detach() + self.config.margin > 0).float().mean(),
            "dro/expert": e[0].mean(), "dro/policy": e[1].mean(), "dro/expert_ref": r[0].mean(),
            "dro/policy_ref": r[1].mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    register(DiffusionDRO)
