"""``DiffusionTrainer``: a ``transformers.Trainer`` (accelerate, accumulation, schedulers, checkpoints, resume,
callbacks) driving a diffusers denoiser with a trl-plus method's loss.

One step: the collator stacks the K images of B examples ``[K*B, ...]`` (latents cached once, or re-encoded every
batch beyond ``model.cache.latents_budget``; a VAE latent distribution is sampled at every step, as the official
scripts do); each example is repeated ``training.draws`` times; images are flipped when ``training.flip`` says so;
the scorer draws (t, ε) — shared within an example when the method says so — and scores the policy (with grad) and
the reference (adapter off, a frozen copy, or none) on the same x_t; ``method.loss(LossContext)`` receives ℓ
``[K, B, 1]``. Text embeddings are computed once per unique prompt (the empty prompt, for caption dropout, included)
and the text encoders are then freed. Latent caching, flips and draws: :mod:`trl_plus.diffusion.latents`.

A method may add trainable modules of its own to the denoiser and condition it on batch fields beyond the prompt
(``DiffusionMethod.prepare_denoiser`` / ``additions_off`` / ``extra_conditioning``): the added parameters train (the
base frozen or under LoRA), are saved as ``method_weights.safetensors`` and resumed, and the ``adapter`` reference is
the denoiser with them (and its LoRA) switched off.

**Online methods** (``needs.rollout``; :class:`~trl_plus.diffusion.method.DiffusionMethod`'s online hooks): the data
are prompt rows, and each micro-batch is a rollout stage — the policy samples ``rollout.n`` images per prompt
(:meth:`DiffusionTrainer.sample_rollouts`: eval mode, no grad, LoRA on, seeded per step so that two runs are
identical; trajectories recorded when the method says so), the recipe's image scorers score them (decoded by the VAE
only when a scorer reads pixels), ``method.make_examples`` makes the training rows, and the loss runs over those rows
in chunks of ``training.examples_per_forward`` with their gradients summed (the mean over all rows; only the last
chunk's backward is transformers'). ``rollout.every`` > 1 trains the steps between on the last rows again. Logged:
``rollout/reward`` (the mean weighted reward of the samples: the figure an online run improves), ``rollout/rows``.
Held-out prompts are evaluated as ``eval_rollout/reward``: fixed-seed samples (:meth:`DiffusionTrainer.sample_reward`).
With ``Scoring.source = "transitions"`` the rows are stored sampler steps and ℓ is the step's log-density
(:meth:`DiffusionTrainer.transition_score`). Online runs are single-process (or DDP) runs: a DeepSpeed engine steps
inside its own backward, which the chunked backward would break.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..contract import LossContext, Method
from ..errors import TrlPlusError
from ..trainers import resolve_method
from ..trainers.frozen import resolve_reference_mode
from ..trainers.guard import GuardMixin
from ..trainers.metrics import append_pair_metrics, gathered_mean
from .data import (
    GROUP,
    NUM_SEQUENCES,
    PROMPT_IDS,
    PROMPT_ROWS,
    TRANSITION,
    X0,
    PromptRowsCollator,
    is_latent_file,
    load_image,
    load_latent,
)
from .inversion import guided_prediction
from .latents import (
    DEFAULT_LATENT_BUDGET,
    IMAGE_ID,
    MEMORY,
    draw_flips,
    flip_rows,
    plan_latent_cache,
    repeat_draws,
    tensor_bytes,
)
from .method import ImageRollouts
from .models import (
    DiffusionBundle,
    complete_pipeline,
    denoiser_kind,
    denoiser_subfolder,
    has_lora,
    load_added_parameters,
    load_denoiser_weights,
    save_added_parameters,
    save_denoiser,
)
from .sampling import (
    ParameterState,
    check_sampling,
    ddim_step_logp,
    implied_noise,
    is_flow_scheduler,
    sample,
)
from .scorer import DenoisingScorer, Noised, ScoreOutput, check_scoring_options

logger = logging.getLogger(__name__)


@dataclass
class DiffusionConfig(TrainingArguments):
    """``TrainingArguments`` plus the scorer's fields (the recipe's ``training`` block of a diffusion run); the
    defaults are the official Diffusion-DPO code's, except ``caption_dropout`` (official: 0.2, set in the recipe)."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode", "stratified", "range"] = field(
        default="uniform", metadata={"help": "how t is drawn (flow models: logit_normal; range: in timestep_range)"})
    timestep_range: list[float] | None = field(
        default=None, metadata={"help": "range: [lo, hi) in model timesteps (DDPM index; flow: 1000·σ)"})
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal: mean"})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal: standard deviation"})
    mode_scale: float = field(default=1.29, metadata={"help": "mode sampling: scale (SD3)"})
    weighting: Literal["half", "unit", "snr", "min_snr", "flow_elbo"] = field(
        default="half", metadata={"help": "w(t) in ℓ = −w·ē (half makes β the official one)"})
    snr_gamma: float = field(default=5.0, metadata={"help": "min_snr: γ"})
    caption_dropout: float = field(default=0.0, metadata={"help": "probability an example's prompt is empty"})
    share_timestep: bool | None = field(default=None, metadata={"help": "override the method's t sharing"})
    share_noise: bool | None = field(default=None, metadata={"help": "override the method's ε sharing"})
    flip: Literal["none", "shared", "independent"] = field(
        default="none", metadata={"help": "random horizontal flips in training: per example or per image"})
    draws: int = field(default=1, metadata={"help": "independent (t, ε) draws per example, each its own loss term"})
    examples_per_forward: int = field(
        default=0, metadata={"help": "online methods: training rows per forward/backward (0: all of a micro-batch)"})
    remove_unused_columns: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.examples_per_forward < 0:
            raise ValueError(f"examples_per_forward must be >= 0, got {self.examples_per_forward}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_scoring_options(vars(self))


class DiffusionTrainer(GuardMixin, Trainer):
    """``transformers.Trainer`` for a :class:`~trl_plus.diffusion.method.DiffusionMethod` on a
    :class:`~trl_plus.diffusion.models.DiffusionBundle`.

    ``train_dataset`` / ``eval_dataset``: rows (a list of dicts or a ``datasets.Dataset``) with a ``prompt`` and the
    method's image columns (paths), or with ready latents ``x0`` ``[K, C, h, w]`` (tests, cached latents).
    ``encode_prompts(list[str]) -> {"text": [P, L, H], "pooled": [P, D] | absent}`` replaces the pipeline's text
    encoders (a bundle without a pipeline needs it). ``reference_mode``: ``auto`` (LoRA: adapter off; else a
    frozen copy; reference-free methods: none), ``adapter``, ``model`` or ``none``. ``resolution``: images are
    resized and center-cropped to it. ``latent_cache`` (``auto`` / ``True`` / ``False``) and ``latent_budget``
    (bytes): where the images' latents live (``model.cache.latents`` / ``latents_budget``;
    :func:`~trl_plus.diffusion.latents.plan_latent_cache`), the decision kept as ``self.latent_cache``.
    """

    def __init__(self, bundle: DiffusionBundle, args: DiffusionConfig | None = None, *,
                 method: str | Method | type[Method] = "diffusion-dpo", method_args: Mapping[str, Any] | None = None,
                 reference_mode: str = "auto", ref_model=None, train_dataset=None, eval_dataset=None,
                 encode_prompts=None, resolution: int | None = None, data_collator=None,
                 latent_cache: str | bool = "auto", latent_budget: int = DEFAULT_LATENT_BUDGET, rollout=None,
                 scorers=(), **kwargs):  # fmt: skip
        self.method = resolve_method(method, method_args)
        if self.method.trainer != "diffusion":
            raise TrlPlusError(f"method {self.method.name!r} runs on a {self.method.trainer!r} trainer, not on "
                               "DiffusionTrainer (a diffusion method: diffusion-dpo, diffusion-sft, ...)")  # fmt: skip
        if args is None:
            args = DiffusionConfig(f"runs/{self.method.name}", report_to="none", use_cpu=not torch.cuda.is_available())
        self.bundle = bundle
        denoiser = bundle.denoiser
        scoring = self.method.scoring
        self.scorer = DenoisingScorer(
            bundle.scheduler, timestep_sampling=args.timestep_sampling, logit_mean=args.logit_mean,
            logit_std=args.logit_std, mode_scale=args.mode_scale, weighting=args.weighting, snr_gamma=args.snr_gamma,
            share_timestep=scoring.share_timestep if args.share_timestep is None else args.share_timestep,
            share_noise=scoring.share_noise if args.share_noise is None else args.share_noise,
            timestep_range=args.timestep_range,
        )  # fmt: skip
        if scoring.denoisers is not None and bundle.kind not in scoring.denoisers:
            raise TrlPlusError(f"method {self.method.name!r} drives {' / '.join(scoring.denoisers)} denoisers only, "
                               f"not a {type(denoiser).__name__} ({bundle.kind})")  # fmt: skip
        if self.scorer.target not in scoring.targets:
            raise TrlPlusError(f"method {self.method.name!r} trains {' / '.join(scoring.targets)} targets, but the "
                               f"scheduler ({type(bundle.scheduler).__name__}) predicts {self.scorer.target}")
        self.resolution = resolution
        self.flip = args.flip
        self.set_rollout(rollout, scorers)
        self._prompts: dict[str, int] = {"": 0}  # the empty prompt first: caption dropout
        self._images: list[str] = []  # the image files of examples encoded on the fly (x0 {"image_id": [K]})
        train_rows, eval_rows = _as_rows(train_dataset), _as_rows(eval_dataset)
        self.latent_cache = self.plan_latents([*(train_rows or ()), *(eval_rows or ())], latent_cache, latent_budget)
        train_examples = self.prepare_examples(train_rows)
        eval_examples = self.prepare_examples(eval_rows)
        self.added_parameters = self.add_method_modules(denoiser, train_examples)
        self.reference_mode = resolve_reference_mode(self.method, reference_mode,
                                                     has_lora(denoiser) or bool(self.added_parameters),
                                                     has_ref_model=ref_model is not None)  # fmt: skip
        if self.reference_mode == "none" and ref_model is not None:
            raise TrlPlusError(f"method {self.method.name!r} runs without a reference; do not pass ref_model")
        if self.reference_mode == "model" and ref_model is None:
            ref_model = copy.deepcopy(denoiser).eval().requires_grad_(False)  # the initial policy, frozen
        self.ref_model = ref_model
        self.text_cache = self.encode_text(list(self._prompts), encode_prompts)
        self.release_text_encoders()
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_generator: torch.Generator | None = None
        self.example_collator = self.method.batch_collator()
        if data_collator is None:
            data_collator = PromptRowsCollator() if self.online else self.example_collator
        self.parameter_states: dict[str, ParameterState] = {}
        self._saved_states: dict[str, dict[str, torch.Tensor]] = {}
        self._online_rows: dict[int, list[dict]] = {}
        self._stage_columns: dict[str, list] = {}  # the current rollout stage's prompt rows' data columns
        self._micro = 0
        super().__init__(model=denoiser, args=args, data_collator=data_collator, train_dataset=train_examples,
                         eval_dataset=eval_examples, **kwargs)  # fmt: skip
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if self.online:
            self.add_callback(_StepEnd(self))

    @classmethod
    def from_recipe(cls, recipe, method: Method, training: dict[str, Any], train_dataset=None, eval_dataset=None,
                    callbacks=None, model=None, **online) -> DiffusionTrainer:  # fmt: skip
        """The trainer a validated diffusion recipe describes (``trl_plus.train`` calls it after the data checks):
        the pipeline loaded as ``recipe.model`` says, ``training`` (checked) as a :class:`DiffusionConfig`;
        ``online``: an online method's ``rollout`` and ``scorers`` (built from the recipe's ``rollout:`` block).
        ``model``: train this denoiser (a ``phases:`` run's, as the previous phase left it) instead of the loaded
        one; the loaded one, frozen, is then the reference of a method that needs a frozen copy (the initial
        policy, not the previous phase's)."""
        from ..models.load import resolve_model_path
        from .models import load_diffusion

        training = dict(training)
        training.setdefault("report_to", "none")
        training.setdefault("use_cpu", not torch.cuda.is_available())
        training.setdefault("seed", 42)
        if eval_dataset is not None:
            training.setdefault("eval_strategy", "steps")
        args = DiffusionConfig(**training)
        bundle = load_diffusion(recipe.model, resolve_model_path(recipe.model.name_or_path))
        if bundle.quantization:
            logger.warning(f"model.quantization: 4-bit denoiser through the {bundle.quantization} path")
        cache = recipe.model.cache
        latents = {} if cache is None else {"latent_cache": cache.latents, "latent_budget": int(cache.latents_budget)}
        latents.update(online)
        if model is not None:  # a later phase: its policy, the pipeline's own denoiser as the initial reference
            loaded, bundle.denoiser = bundle.denoiser, model
            for name in ("unet", "transformer"):
                if getattr(bundle.pipeline, name, None) is loaded:
                    setattr(bundle.pipeline, name, model)
            if (method.needs.reference != "no" and recipe.reference.mode in ("auto", "model")
                    and not has_lora(model)):  # fmt: skip
                latents["ref_model"] = loaded.eval().requires_grad_(False)
        return cls(bundle, args, method=method, reference_mode=recipe.reference.mode, train_dataset=train_dataset,
                   eval_dataset=eval_dataset, resolution=recipe.model.resolution, callbacks=callbacks,
                   nan=recipe.training.get("nan", "stop"), **latents)  # fmt: skip

    def add_method_modules(self, denoiser, examples) -> list[str]:
        """The method's own modules on the denoiser (``DiffusionMethod.prepare_denoiser``): the names of the added
        parameters, trained in fp32; refused when the base would train in full beside them (it would not be saved)."""
        names = list(self.method.prepare_denoiser(denoiser, examples or []))
        if not names:
            return names
        parameters = dict(denoiser.named_parameters())
        for name in names:
            parameters[name].data = parameters[name].data.float()
            parameters[name].requires_grad_(True)
        if not has_lora(denoiser) and any(p.requires_grad for n, p in parameters.items() if n not in names):
            raise TrlPlusError(f"method {self.method.name!r} adds its own modules to the denoiser and trains only them "
                               "(or them and a LoRA): its prepare_denoiser must freeze the base")  # fmt: skip
        return names

    # -- data -------------------------------------------------------------------------------------------------
    def prompt_id(self, prompt: str) -> int:
        """The row of ``prompt`` in the text cache (registered on first sight)."""
        return self._prompts.setdefault(prompt, len(self._prompts))

    def plan_latents(self, rows: list[dict], setting: str | bool, budget: int) -> dict[str, Any]:
        """Where the latents of ``rows`` (train and eval) live: in memory or re-encoded every batch
        (:func:`~trl_plus.diffusion.latents.plan_latent_cache`; ``auto`` measures one image's encoding), logged."""
        pending = [row for row in rows if "x0" not in row] if not self.online else []
        images = sum(len(self.method.images(row)) for row in pending)
        measured = None
        if setting == "auto" and images:
            measured = tensor_bytes(self.encode_images(self.method.images(pending[0])[:1]))
        plan = plan_latent_cache(setting, images, measured, budget)
        if images:
            (logger.info if plan["mode"] == MEMORY else logger.warning)(plan["message"])
        return plan

    def prepare_examples(self, rows) -> list[dict] | None:
        """Rows -> examples ``{"x0": [K, ...] | {"mean", "std"(, "flip_mean", "flip_std")} | {"image_id": [K]},
        "prompt_id", fields...}``: images loaded once (resized to ``resolution``) and encoded by the VAE into its
        latent distribution, scaled (and shifted) as the pipeline's latents — or, when ``self.latent_cache`` says
        on-the-fly, only indexed (:meth:`clean_latents` encodes them each batch); without a VAE the pixels are the
        latents."""
        if rows is None:
            return None
        rows = _as_rows(rows)
        if self.online:  # prompt rows: the rollout stage makes the images
            return [{"prompt_id": self.prompt_id(row.get("prompt", "")), "prompt": row.get("prompt", ""),
                     "columns": {k: v for k, v in row.items() if k not in ("prompt", "_row")}} for row in rows]
        in_memory = self.latent_cache["mode"] == MEMORY
        segments = self.method.scoring.segments
        fields = (*self.method.batch_fields, "label", *((segments,) if segments else ()))
        examples = []
        for row in rows:
            example = {"prompt_id": self.prompt_id(row.get("prompt", ""))}
            for key, text in self.method.extra_prompts(row).items():  # further prompts the loss conditions on
                example[key] = self.prompt_id(text)
            example.update({name: row[name] for name in fields if name in row})
            if "x0" in row:
                example["x0"] = row["x0"]
            elif in_memory or all(is_latent_file(p) for p in self.method.images(row)):  # ready latents: as they are
                example["x0"] = self.encode_images(self.method.images(row))
            else:
                example["x0"] = {IMAGE_ID: self.image_ids(self.method.images(row))}
            examples.append(example)
        return examples

    def image_ids(self, paths: list[str]) -> torch.Tensor:
        """``[K]`` the indices of ``paths`` in the trainer's list of images encoded on the fly (appended)."""
        start = len(self._images)
        self._images.extend(paths)
        return torch.arange(start, start + len(paths))

    def load_pixels(self, paths: list[str]) -> torch.Tensor:
        """``[K, C, H, W]`` images in [-1, 1], resized and center-cropped to ``resolution`` (RGB for a VAE, else the
        denoiser's channels)."""
        channels = 3 if self.bundle.vae is not None else self.bundle.denoiser.config.in_channels
        return torch.stack([load_image(p, self.resolution, channels) for p in paths])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"mean", "std"}`` ``[N, c, h, w]`` (fp32, CPU) of the VAE's latent distribution of ``pixels``, scaled
        (and shifted) as the pipeline's latents: (z − shift)·scale."""
        vae = self.bundle.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
        return {"mean": ((dist.mean - shift) * scale).float().cpu(), "std": (dist.std * scale).float().cpu()}

    def encode_images(self, paths: list[str]):
        """The K images of one example as latents: ``{"mean", "std"}`` ``[K, c, h, w]`` of the VAE's latent
        distribution (:meth:`encode_pixels`) and, with ``training.flip`` on, ``flip_mean`` / ``flip_std`` of the
        mirrored images (a flipped latent is not the encoding of the flipped image); pixels ``[K, C, H, W]`` in
        [-1, 1] without a VAE (flipped exactly at each step); latent files
        (:func:`~trl_plus.diffusion.data.load_latent`) are stacked as they are."""
        if paths and all(is_latent_file(p) for p in paths):  # ready latents ([C, h, w] / videos [C, F, h, w])
            return torch.stack([load_latent(p) for p in paths])
        pixels = self.load_pixels(paths)
        if self.bundle.vae is None:
            return pixels
        latents = self.encode_pixels(pixels)
        if self.flip != "none":
            flipped = self.encode_pixels(pixels.flip(-1))
            latents.update(flip_mean=flipped["mean"], flip_std=flipped["std"])
        return latents

    @torch.no_grad()
    def encode_text(self, prompts: list[str], encode_prompts=None) -> dict[str, torch.Tensor]:
        """The text cache: each unique prompt encoded once (``text`` ``[P, L, H]``, SD3 and Flux ``pooled`` ``[P, D]``;
        Flux: the tokens from T5, the pooled text from CLIP, as ``FluxPipeline.encode_prompt``)."""
        if encode_prompts is None:
            encode_prompts = self._pipeline_encoder()
        cache = {}
        for start in range(0, len(prompts), 64):
            part = encode_prompts(prompts[start:start + 64])
            for key, value in part.items():
                cache.setdefault(key, []).append(value.detach().float().cpu())
        return {key: torch.cat(values) for key, values in cache.items()}

    def release_text_encoders(self) -> None:
        """Free the pipeline's text encoders once every prompt is in the text cache (an SD3 T5-XXL never sits next to
        the trained denoiser); the tokenizers stay."""
        pipeline = self.bundle.pipeline
        if pipeline is None:
            return
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipeline, name, None) is not None:
                setattr(pipeline, name, None)

    def _pipeline_encoder(self):
        pipeline = self.bundle.pipeline
        if pipeline is None:
            raise TrlPlusError("a DiffusionBundle without a pipeline needs encode_prompts (prompts -> embeddings)")
        device = next(pipeline.text_encoder.parameters()).device
        kind = denoiser_kind(self.bundle.denoiser)
        if kind == "wan":  # UMT5 hidden states, padded with zeros past each prompt
            def encode(prompts):
                text, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                 max_sequence_length=pipeline.tokenizer.model_max_length)
                return {"text": text}
        elif kind == "flux":  # the tokens from T5 (tokenizer_2's length), the pooled text from CLIP
            positions = pipeline.tokenizer_2.model_max_length

            def encode(prompts):
                text, pooled, _ = pipeline.encode_prompt(prompts, None, device=device, max_sequence_length=positions)
                return {"text": text, "pooled": pooled}
        elif kind == "sd3":
            positions = pipeline.tokenizer.model_max_length

            def encode(prompts):
                text, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device=device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=positions)  # fmt: skip
                return {"text": text, "pooled": pooled}
        else:
            def encode(prompts):
                return {"text": pipeline.encode_prompt(prompts, device, 1, False)[0]}
        return encode

    # -- the step ---------------------------------------------------------------------------------------------
    def clean_latents(self, inputs: Mapping[str, Any], generator=None) -> torch.Tensor:
        """``[K*B, ...]`` the batch's clean latents x0: a VAE latent distribution — cached, or encoded now from the
        image files — sampled with ``generator``; in training with ``training.flip`` on, the flipped images'
        (:func:`~trl_plus.diffusion.latents.draw_flips` draws first, with the same generator)."""
        flips = None
        if self.flip != "none" and self.model.training:
            flips = draw_flips(inputs[GROUP], inputs[PROMPT_IDS].size(0), self.flip, generator)
        if X0 in inputs:  # pixels or ready latents: flipped as tensors
            return flip_rows(inputs[X0], flips)
        if f"{X0}_{IMAGE_ID}" in inputs:
            ids = inputs[f"{X0}_{IMAGE_ID}"]
            pixels = flip_rows(self.load_pixels([self._images[i] for i in ids.tolist()]), flips)
            if self.bundle.vae is None:
                return pixels.to(ids.device)
            dist = {key: value.to(ids.device) for key, value in self.encode_pixels(pixels).items()}
            mean, std = dist["mean"], dist["std"]
        else:
            mean, std = inputs[f"{X0}_mean"], inputs[f"{X0}_std"]
            if flips is not None and f"{X0}_flip_mean" in inputs:  # the cached encodings of the flipped images
                where = flips.to(mean.device).view(-1, *([1] * (mean.dim() - 1)))
                mean = torch.where(where, inputs[f"{X0}_flip_mean"], mean)
                std = torch.where(where, inputs[f"{X0}_flip_std"], std)
            elif flips is not None:  # ready latent distributions without flipped encodings
                mean, std = flip_rows(mean, flips), flip_rows(std, flips)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        return mean + std * noise

    def denoiser_dtype(self, model) -> torch.dtype:
        """The floating dtype of ``model``'s parameters (the latents and conditioning are cast to it)."""
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def conditioning(self, prompt_ids: torch.Tensor, group: torch.Tensor, dtype, device) -> dict[str, torch.Tensor]:
        """Per-row conditioning from the text cache (the K images of an example share their prompt's rows)."""
        rows = prompt_ids.cpu()[group.cpu()]
        return {key: value[rows].to(device=device, dtype=dtype) for key, value in self.text_cache.items()}

    def score(self, model, inputs: Mapping[str, Any], generator=None, reference: bool = True) -> ScoreOutput:
        """One draw of (t, ε) for the batch; the policy's and (when the run has one and ``reference``) the
        reference's scores."""
        custom = getattr(self.method, "score", None)
        if custom is not None and (result := custom(self, inputs, model=model, generator=generator)) is not None:
            return result
        if self.method.scoring.source == "transitions":
            return self.transition_score(model, inputs, reference)
        x0 = self.clean_latents(inputs, generator)
        group, prompt_ids = inputs[GROUP], inputs[PROMPT_IDS]
        dropout = self.args.caption_dropout
        if dropout > 0 and model.training:  # one draw per example: both images of a pair lose the prompt together
            drop = torch.rand(prompt_ids.shape, generator=generator) < dropout
            prompt_ids = torch.where(drop.to(prompt_ids.device), torch.zeros_like(prompt_ids), prompt_ids)
        dtype = self.denoiser_dtype(model)
        cond = self.method.extra_conditioning(self, inputs, self.conditioning(prompt_ids, group, dtype, x0.device),
                                              generator)  # fmt: skip
        reference = None if self.reference_mode == "none" or not reference else self.reference_errors
        segments = self.method.scoring.segments
        segments = None if segments is None else inputs[segments][group.to(inputs[segments].device)]
        return self.scorer.score(model, x0.to(dtype), group, prompt_ids.size(0), cond, reference, generator,
                                 segments=segments)  # fmt: skip

    def reference_errors(self, noised, cond) -> torch.Tensor:
        """``[N]`` the reference's errors on the policy's x_t: the adapter switched off (no second copy of the base
        weights) or the frozen copy."""
        with self.reference_denoiser() as reference:
            return self.scorer.errors(reference, noised, cond)

    @contextlib.contextmanager
    def reference_denoiser(self):
        """The reference as a denoiser, for the ``with`` block: the frozen copy, or the policy with its adapter and
        the method's added modules switched off (switched back on afterwards). Call it under ``torch.no_grad()``."""
        if self.reference_mode == "none":
            raise TrlPlusError(f"method {self.method.name!r} runs without a reference")
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        lora = has_lora(unwrapped)
        if lora:
            unwrapped.disable_adapters()
        try:
            with self.method.additions_off(unwrapped):
                yield unwrapped
        finally:
            if lora:
                unwrapped.enable_adapters()

    def _prepare_inputs(self, inputs):
        """transformers' device placement, then every example repeated ``training.draws`` times (each copy its own
        (t, ε) and its own term of the loss: :func:`~trl_plus.diffusion.latents.repeat_draws`); an online
        micro-batch's prompt rows pass as they are."""
        if isinstance(inputs, Mapping) and PROMPT_ROWS in inputs:
            return inputs
        return repeat_draws(super()._prepare_inputs(inputs), self.args.draws)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss on the scorer's ℓ ``[K, B, 1]`` (metrics logged with the text trainer's names); an
        online micro-batch: the rollout stage, then the loss over its rows (see the module doc)."""
        if PROMPT_ROWS in inputs:
            return self.online_loss(model, inputs[PROMPT_ROWS])
        mode = "train" if model.training else "eval"
        generator = self._eval_generator if mode == "eval" else None
        score = self.score(model, inputs, generator)
        k, b = inputs[NUM_SEQUENCES], inputs[PROMPT_IDS].size(0)

        def grid(rows):
            return None if rows is None else rows.view(k, b, *rows.shape[1:])

        ctx = LossContext(token_logps=grid(score.logps), mask=grid(score.mask), ref_token_logps=grid(score.ref_logps),
                          batch=inputs, outputs=score, step=self.state.global_step, training=mode == "train")
        result = self.method.loss(ctx)
        self._log_step_metrics(mode, ctx, result, score)
        return (result.loss, score) if return_outputs else result.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss on fixed-seed draws (the same (t, ε) at every evaluation), no predictions."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        """transformers' evaluation with the draws seeded by ``args.seed`` (comparable across evaluations); an online
        run's: ``eval_rollout/reward`` of fixed-seed samples of the held-out prompts."""
        if self.online:
            metrics = {"eval_rollout/reward": self.sample_reward(seed=self.args.seed)}
            self.log(dict(metrics))
            return metrics
        self._eval_generator = torch.Generator().manual_seed(self.args.seed)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._eval_generator = None

    @staticmethod
    def are_pairs(examples) -> bool:
        """Whether prepared ``examples`` are pairs (K = 2 images each), the shape :meth:`pair_scores` scores."""
        if not examples or X0 not in examples[0]:  # an online method's prompt rows: no images to score
            return False
        first = examples[0]["x0"]
        return (next(iter(first.values())) if isinstance(first, dict) else first).size(0) == 2

    @torch.no_grad()
    def pair_scores(self, examples=None, draws: int = 8, batch_size: int | None = None):
        """The held-out table's scores ``[P, 2]`` float64 (``logps`` of :class:`~trl_plus.run.evaluate.PairScores`)
        of the current denoiser on ``examples`` (default: the eval set): each pair's ℓ = −w·ē of its two images, averaged
        over ``draws`` draws of (t, ε) shared by the pair and seeded by ``args.seed`` — the same draws at every call,
        so scores before and after training compare on identical noise. ``None`` when the examples are not pairs
        (K ≠ 2: lists, single images). On one process (``trl-plus train`` calls it on the main process's view)."""
        examples = self.eval_dataset if examples is None else examples
        if not self.are_pairs(examples):
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.args.seed)
        size = batch_size or self.args.per_device_eval_batch_size
        rows = []
        try:
            for start in range(0, len(examples), size):
                batch = Trainer._prepare_inputs(self, self.data_collator(examples[start:start + size]))
                b = batch[PROMPT_IDS].size(0)
                total = torch.zeros(2, b, dtype=torch.float64)
                for _ in range(draws):
                    # the table compares the policy with itself before training: no reference forward
                    scores = self.score(model, batch, generator, reference=False)
                    total += scores.logps.view(2, b, -1).sum(-1).double().cpu()
                rows.append((total / draws).T)
        finally:
            model.train(was_training)
        return torch.cat(rows)


    # -- online methods -----------------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        """Whether the method samples its own images (``needs.rollout``)."""
        return self.method.needs.rollout is not None

    def set_rollout(self, rollout=None, scorers=()) -> None:
        """The rollout (the method's ``needs.rollout``, or the recipe's) and the image scorers ``[(Scorer, weight)]``
        of an online method, checked in one line: sampler settings the scheduler can run, scorers that read images."""
        self.rollout, self.scorers, self.sampling = None, (), None
        if not self.online:
            if rollout is not None or scorers:
                raise TrlPlusError(f"method {self.method.name!r} trains on its data, it samples nothing: remove the "
                                   "rollout: block")  # fmt: skip
            return
        self.rollout = rollout or self.method.needs.rollout
        if not scorers:
            raise TrlPlusError(f"method {self.method.name!r} scores its own samples: give rollout.scorers, e.g. "
                               "[{name: brightness}] (trl-plus list --scorers)")  # fmt: skip
        for scorer, _ in scorers:
            if scorer.inputs not in ("pixels", "latents"):
                raise TrlPlusError(f"rollout.scorers: {scorer.name} scores text; a diffusion run's scorers read images "
                                   "(inputs: pixels or latents), e.g. brightness, ink, latent-mean")  # fmt: skip
        if self.bundle.kind == "wan":
            raise TrlPlusError(f"method {self.method.name!r}: online sampling drives image denoisers (unet, sd3, "
                               "flux), not video (wan)")  # fmt: skip
        self.sampling = check_sampling(dict(self.rollout.decoding), self.bundle.scheduler)
        if self.method.scoring.source == "transitions" and (
                is_flow_scheduler(self.bundle.scheduler) or self.sampling["eta"] <= 0):  # fmt: skip
            raise TrlPlusError(f"method {self.method.name!r} trains on the sampler's step densities: it needs a "
                               "DDPM-family scheduler and rollout.decoding.eta > 0 (DDIM with noise)")  # fmt: skip
        self.scorers = tuple((scorer, scorer.output_weights(weight)) for scorer, weight in scorers)

    def policy(self):
        """The trained denoiser, unwrapped (LoRA and the method's modules on)."""
        return self.accelerator.unwrap_model(self.model)

    def cond(self, prompt_ids: torch.Tensor, dtype=None, device=None) -> dict[str, torch.Tensor]:
        """Per-row conditioning of text-cache rows ``prompt_ids`` ``[N]`` (row 0: the empty prompt)."""
        dtype = dtype or self.denoiser_dtype(self.model)
        device = device or self.args.device
        return self.conditioning(prompt_ids, torch.arange(len(prompt_ids)), dtype, device)

    def uncond(self, n: int, dtype=None, device=None) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, ``n`` rows (classifier-free guidance)."""
        return self.cond(torch.zeros(n, dtype=torch.long), dtype, device)

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one image's latents ``[C, h, w]`` (``model.resolution`` through the VAE's downsampling, else
        the denoiser's ``sample_size``)."""
        config = self.bundle.denoiser.config
        channels = config.in_channels // 4 if self.bundle.kind == "flux" else config.in_channels
        vae = self.bundle.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        if self.resolution:
            side = self.resolution // factor
        else:
            side = config.get("sample_size", None) or 64
            side = side[0] if isinstance(side, (list, tuple)) else side
        return (channels, side, side)

    def initial_noise(self, n: int, generator=None) -> torch.Tensor:
        """``[n, C, h, w]`` x_T drawn from ``generator`` (fp32, CPU: the same draws on any device)."""
        return torch.randn((n, *self.latent_shape()), generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` pixels in [0, 1] of latents (the VAE's decoder, after undoing the pipeline's scale and
        shift; a pixel-space model's latents are pixels in [-1, 1])."""
        vae = self.bundle.vae
        if vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
        z = latents.to(vae.device, vae.dtype) / scale + shift
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()

    def score_images(self, prompts: list[str], latents: torch.Tensor, columns: dict[str, list] | None = None):
        """``(scores [N, S] float64, weights [S], names, images or None)``: every scorer of the run on the images
        (decoded once, only when a scorer reads pixels)."""
        columns = columns or {}
        images = None
        if any(scorer.inputs == "pixels" for scorer, _ in self.scorers):
            images = self.decode(latents)
        scores, weights, names = [], [], []
        for scorer, weight in self.scorers:
            wanted = {c: columns[c] for c in scorer.columns if c in columns}
            value = images if scorer.inputs == "pixels" else latents.float().cpu()
            scores.append(scorer.checked_scores(list(prompts), value, **wanted))
            weights += weight
            names += [f"{scorer.name}/{o}" if len(scorer.outputs) > 1 else scorer.name for o in scorer.outputs]
        return torch.cat(scores, -1), torch.tensor(weights, dtype=torch.float64), tuple(names), images

    def rollout_generator(self, offset: int = 0) -> torch.Generator:
        """The rollout stage's generator, seeded by ``args.seed``, the optimizer step, the micro-batch and the process
        (the training RNG is left alone: two identical runs sample identical images)."""
        seed = hash((self.args.seed, self.state.global_step, self._micro, self.args.process_index, offset))
        return torch.Generator().manual_seed(seed % (2**63))

    @torch.no_grad()
    def sample_images(self, prompt_ids: torch.Tensor, x_T: torch.Tensor, *, generator=None, record: bool = False,
                      model=None, **kwargs):  # fmt: skip
        """The :class:`~trl_plus.diffusion.sampling.Trajectory` of ``x_T`` ``[N, ...]`` under text-cache rows
        ``prompt_ids`` ``[N]`` with the run's sampler settings (``kwargs`` override them, or pass ``noise``,
        ``start``, ``stop``, ``guidance_fn`` to :func:`~trl_plus.diffusion.sampling.sample`); ``model`` (default: the
        policy) in eval mode for the call."""
        model = model or self.policy()
        settings = {**self.sampling, **{k: kwargs.pop(k) for k in list(kwargs) if k in self.sampling}}
        dtype, device = self.denoiser_dtype(model), self.args.device
        cond = self.cond(prompt_ids, dtype, device)
        uncond = self.uncond(len(prompt_ids), dtype, device) if settings["guidance"] != 1 else None
        was_training = model.training
        model.eval()
        try:
            trajectory = sample(model, self.bundle.scheduler, x_T.to(device), cond, settings["steps"],
                                eta=settings["eta"], guidance=settings["guidance"], uncond=uncond,
                                generator=generator, record=record, **kwargs)  # fmt: skip
        finally:
            model.train(was_training)
        return trajectory

    def sample_rollouts(self, prompt_ids: torch.Tensor, n: int | None = None, generator=None, record: bool | None = None,
                        share_start: bool | None = None, model=None, columns: dict[str, list] | None = None
                        ) -> ImageRollouts:  # fmt: skip
        """``n`` (default ``rollout.n``) images per text-cache row of ``prompt_ids`` ``[Q]``, group-major, from the
        policy (or ``model``), scored: an :class:`~trl_plus.diffusion.method.ImageRollouts`. ``record``,
        ``share_start`` default to the method's; ``generator`` to :meth:`rollout_generator`; ``columns`` (one value
        per prompt, for scorers that read data columns) to the current rollout stage's prompt rows' columns."""
        n = n or self.rollout.n
        record = self.method.record if record is None else record
        share_start = self.method.share_start if share_start is None else share_start
        generator = generator or self.rollout_generator()
        q = len(prompt_ids)
        rows = torch.as_tensor(prompt_ids, dtype=torch.long).repeat_interleave(n)
        if share_start:
            x_T = self.initial_noise(q, generator).repeat_interleave(n, 0)
        else:
            x_T = self.initial_noise(q * n, generator)
        trajectory = self.sample_images(rows, x_T, generator=generator, record=record, model=model)
        latents = trajectory.latents[-1].cpu()
        prompts = self.prompt_texts(rows)
        if columns is None:  # the stage's prompt rows, when these are their prompts
            columns = self._stage_columns if all(len(v) == q for v in self._stage_columns.values()) else {}
        repeated = {key: [v for v in values for _ in range(n)] for key, values in columns.items()}
        scores, weights, names, images = self.score_images(prompts, latents, repeated)
        return ImageRollouts(prompts=prompts, prompt_ids=rows, group=torch.arange(q).repeat_interleave(n),
                             latents=latents, scores=scores, weights=weights, score_names=names,
                             trajectory=trajectory if record else None, images=images, columns=repeated)  # fmt: skip

    def prompt_texts(self, prompt_ids) -> list[str]:
        """The texts of text-cache rows ``prompt_ids`` (``[N]``; row 0 is the empty prompt): for a method's own
        rollout (SPO's branching sampler) that scores images with :meth:`score_images`."""
        texts = list(self._prompts)  # insertion order: the text cache's rows
        return [texts[int(i)] for i in prompt_ids]

    @torch.no_grad()
    def sample_reward(self, prompts: list[str] | None = None, seed: int = 0, n: int | None = None,
                      model=None) -> float:  # fmt: skip
        """The mean weighted reward of fixed-seed samples (``n`` per prompt; default ``rollout.n``) of ``prompts``
        (default: the held-out prompts, else the training prompts): the generation-side figure of an online run —
        the same seed gives the same x_T and step noises before and after training."""
        columns = None
        if prompts is None:
            examples = self.eval_dataset or self.train_dataset
            prompts, columns = [e["prompt"] for e in examples], _columns(examples)
        unknown = [p for p in prompts if p not in self._prompts]
        if unknown:
            raise TrlPlusError(f"sample_reward: {unknown[0]!r} is not in the text cache (the prompts of the trainer's "
                               "train and eval rows are)")  # fmt: skip
        ids = torch.tensor([self._prompts[p] for p in prompts], dtype=torch.long)
        rollouts = self.sample_rollouts(ids, n=n, generator=torch.Generator().manual_seed(seed), record=False,
                                        share_start=False, model=model, columns=columns)  # fmt: skip
        return float(rollouts.reward().mean())

    def parameter_state(self, name: str) -> ParameterState:
        """The named lagged / EMA copy of the policy's trainable tensors (created from the current ones on first use;
        saved in checkpoints as ``parameter_states.safetensors`` and restored on resume)."""
        if name not in self.parameter_states:
            state = ParameterState(self.policy())
            if name in self._saved_states:
                state.load_state_dict(self._saved_states.pop(name))
            self.parameter_states[name] = state
        return self.parameter_states[name]

    def online_rows(self, prompt_rows: list[dict]) -> list[dict]:
        """The training rows of one online micro-batch: a fresh rollout stage every ``rollout.every`` optimizer steps
        (else the rows this micro-batch index made last time)."""
        slot = self._micro % max(1, self.args.gradient_accumulation_steps)
        every = max(1, getattr(self.rollout, "every", 1))
        if self.state.global_step % every == 0 or slot not in self._online_rows:
            ids = torch.tensor([row["prompt_id"] for row in prompt_rows], dtype=torch.long)
            self._stage_columns = _columns(prompt_rows)
            try:
                rollouts = self.method.rollout(self, ids)
            finally:
                columns, self._stage_columns = self._stage_columns, {}
            if columns and not rollouts.columns:  # a method's own sampler: the prompts' columns, per row
                rows = rollouts.group.tolist()
                rollouts.columns = {key: [values[g] for g in rows] for key, values in columns.items()}
            self._online_rows[slot] = list(self.method.make_examples(rollouts))
            self._metrics["train"]["rollout/reward"].append(float(rollouts.reward().mean()))
            self._metrics["train"]["rollout/rows"].append(float(len(self._online_rows[slot])))
        self._micro += 1
        return self._online_rows[slot]

    def online_loss(self, model, prompt_rows: list[dict]):
        """The loss of one online micro-batch: its rows in chunks of ``examples_per_forward``, each chunk's loss
        weighted by its share of the rows; every chunk but the last is backpropagated here (scaled as transformers
        scales the last), and the returned value is the whole loss (the earlier chunks' parts detached)."""
        rows = self.online_rows(prompt_rows)
        if not rows:  # every prompt tied: nothing to learn from this micro-batch
            self._metrics["train"]["rollout/empty"].append(1.0)
            return sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        size = self.args.examples_per_forward or len(rows)
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        scale = 1 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        done = None
        for i, chunk in enumerate(chunks):
            batch = self._prepare_inputs(Trainer._prepare_inputs(self, self.example_collator(chunk)))
            part = self.compute_loss(model, batch) * (len(chunk) / len(rows))
            if i == len(chunks) - 1:
                return part if done is None else part + done
            self.accelerator.backward(part * scale)
            done = part.detach() if done is None else done + part.detach()
        return done

    def sampler_prediction(self, denoiser, x_t: torch.Tensor, timesteps: torch.Tensor, prompt_ids: torch.Tensor,
                           group: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``[N, ...]`` fp32: ``denoiser``'s prediction at ``x_t`` as the run's sampler makes it — classifier-free
        guided at ``rollout.decoding.guidance`` (the empty prompt's rows as the unconditional ones) — for rows
        ``group`` of the examples' text-cache rows ``prompt_ids`` (grad as the caller's mode says)."""
        guidance = self.sampling["guidance"]
        dtype = self.denoiser_dtype(denoiser)
        cond = self.conditioning(prompt_ids, group, dtype, x_t.device)
        uncond = None if guidance == 1 else self.uncond(len(group), dtype, x_t.device)
        return guided_prediction(denoiser, x_t.to(dtype), timesteps, cond, uncond, guidance).float()

    def transition_score(self, model, inputs: Mapping[str, Any], reference: bool = True) -> ScoreOutput:
        """ℓ of stored sampler steps (``Scoring.source = "transitions"``): the element-mean DDIM(η) log-density of each
        row's x_prev given its x_t under the model's prediction (classifier-free guided as the rollout samples), the
        reference's under no grad; ``mse`` is ē(prediction, ε*) against the implied noise
        (:func:`~trl_plus.diffusion.sampling.implied_noise`), whose weighted difference the log-ratio is."""
        x_t, x_prev = inputs[f"{TRANSITION}_x_t"].float(), inputs[f"{TRANSITION}_x_prev"].float()
        t, prev = inputs[f"{TRANSITION}_timestep"].long(), inputs[f"{TRANSITION}_prev_timestep"].long()
        group, prompt_ids = inputs[GROUP], inputs[PROMPT_IDS]
        scheduler, eta = self.bundle.scheduler, self.sampling["eta"]
        eps_star, weight = implied_noise(scheduler, x_t, x_prev, t, prev, eta)

        def logp(denoiser):
            output = self.sampler_prediction(denoiser, x_t, t, prompt_ids, group)
            error = ((output - eps_star) ** 2).flatten(1).mean(1)
            return ddim_step_logp(scheduler, x_t, output, x_prev, t, prev, eta), error

        logps, mse = logp(model)
        ref_logps = ref_mse = None
        if reference and self.reference_mode != "none":
            with torch.no_grad(), self.reference_denoiser() as ref:
                ref_logps, ref_mse = logp(ref)
        noised = Noised(x_t=x_t, timesteps=t, target=eps_star, weight=weight, noise=eps_star, t=t)
        return ScoreOutput(logps.unsqueeze(-1), torch.ones_like(logps).unsqueeze(-1),
                           None if ref_logps is None else ref_logps.unsqueeze(-1), mse, ref_mse, noised)  # fmt: skip

    # -- metrics ----------------------------------------------------------------------------------------------
    def _gathered_mean(self, value) -> float:
        return gathered_mean(self.accelerator, value)

    def _log_step_metrics(self, mode: str, ctx: LossContext, result, score: ScoreOutput) -> None:
        metrics = self._metrics[mode]
        append_pair_metrics(metrics, ctx.logps(), result.rewards, self._gathered_mean)
        scored = score.mask.bool() if score.mse.dim() == 2 else slice(None)  # per-segment: the segments with frames
        metrics["mse/policy"].append(self._gathered_mean(score.mse[scored]))
        if score.ref_mse is not None:
            metrics["mse/reference"].append(self._gathered_mean(score.ref_mse[scored]))
        metrics["timestep/mean"].append(self._gathered_mean(score.noised.timesteps.float()))
        for name, value in result.metrics.items():
            metrics[name].append(self._gathered_mean(value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """transformers' log plus the mean of this mode's step metrics since the last log (``eval_`` prefixed)."""
        mode = "train" if self.model.training else "eval"
        averaged = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            averaged = {f"eval_{key}": value for key, value in averaged.items()}
        logs.update(averaged)  # in place: evaluate() returns the dict it logs
        super().log(logs, *args, **kwargs)
        self._metrics[mode].clear()

    # -- saving -----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The trained weights (a LoRA in diffusers' format, or the full denoiser) and the training arguments."""
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if has_lora(denoiser) or not self.added_parameters:  # a method's modules on a frozen base: them alone
            save_denoiser(denoiser, output_dir)
        if self.added_parameters:
            save_added_parameters(denoiser, self.added_parameters, output_dir)
        if self.parameter_states:
            from safetensors.torch import save_file

            save_file({f"{name}::{key}": value.contiguous() for name, state in self.parameter_states.items()
                       for key, value in state.state_dict().items()}, os.path.join(output_dir, STATES_FILE))  # fmt: skip
        method_state = self.method.state_dict()
        if method_state:
            torch.save(method_state, os.path.join(output_dir, METHOD_STATE_FILE))
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' save; the final save of a fully trained denoiser (not a checkpoint, not a LoRA) also
        completes ``output_dir`` into a pipeline folder (:func:`~trl_plus.diffusion.models.complete_pipeline`), so the
        next stage's recipe names it as ``model.name_or_path`` (the quickstart's SFT reference)."""
        super().save_model(output_dir, _internal_call)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if _internal_call or has_lora(unwrapped) or not self.is_world_process_zero() or not self.bundle.name:
            return
        complete_pipeline(self.bundle.name, output_dir or self.args.output_dir, denoiser_subfolder(unwrapped))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Resume: the weights :meth:`_save` wrote (optimizer, scheduler and RNG states are transformers')."""
        denoiser = self.accelerator.unwrap_model(model or self.model)
        if has_lora(denoiser) or not self.added_parameters:
            load_denoiser_weights(denoiser, resume_from_checkpoint)
        if self.added_parameters:
            load_added_parameters(denoiser, self.added_parameters, resume_from_checkpoint)
        method_state = os.path.join(resume_from_checkpoint, METHOD_STATE_FILE)
        if os.path.isfile(method_state):
            self.method.load_state_dict(torch.load(method_state, map_location="cpu", weights_only=True))
        states = os.path.join(resume_from_checkpoint, STATES_FILE)
        if os.path.isfile(states):
            from safetensors.torch import load_file

            for key, value in load_file(states).items():
                name, tensor = key.split("::", 1)
                self._saved_states.setdefault(name, {})[tensor] = value
            for name in list(self._saved_states):
                if name in self.parameter_states:
                    self.parameter_states[name].load_state_dict(self._saved_states.pop(name))


#: The lagged / EMA copies of an online run's checkpoint (:meth:`DiffusionTrainer.parameter_state`).
STATES_FILE = "parameter_states.safetensors"
#: A method's own state between steps (``DiffusionMethod.state_dict``: Diffusion-DRO's replay buffer).
METHOD_STATE_FILE = "method_state.pt"


class _StepEnd(TrainerCallback):
    """Calls the method's ``step_end`` after every optimizer step of an online run."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.method.step_end(self.trainer)


def _columns(prompt_rows: list[dict]) -> dict[str, list]:
    """The data columns of an online method's prepared prompt rows, one list per column (a value per row)."""
    keys = prompt_rows[0]["columns"] if prompt_rows else ()
    return {key: [row["columns"][key] for row in prompt_rows] for key in keys}


def _as_rows(rows) -> list[dict] | None:
    """A ``datasets.Dataset`` or an iterable of dicts as a list of dicts (``None`` stays ``None``)."""
    if rows is None:
        return None
    return rows.to_list() if hasattr(rows, "to_list") else list(rows)
