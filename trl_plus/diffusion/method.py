"""What a diffusion method is: :class:`DiffusionMethod` (a :class:`~trl_plus.Method` run by the ``diffusion``
trainer kind) and :class:`Scoring` (what its denoising scores share and predict). Light: no torch, no diffusers."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..contract import GroupedSamples, Method, Needs

#: How to get the optional extra that diffusion methods need.
DIFFUSION_INSTALL = 'pip install "trl-plus[diffusion]"'

#: Prediction targets a scheduler can define (``auto``: the scheduler's ``prediction_type``, or ``flow`` for a
#: flow-matching scheduler).
TARGETS = ("epsilon", "v_prediction", "flow", "sample")


def diffusers_available() -> bool:
    """Whether ``diffusers`` is installed (found, not imported: ``trl-plus list`` stays fast)."""
    return importlib.util.find_spec("diffusers") is not None


def require_diffusers(what: str) -> None:
    """A one-line error naming ``what`` and the install line when ``diffusers`` is missing."""
    from ..errors import TrlPlusError

    if not diffusers_available():
        raise TrlPlusError(f"{what} needs the optional extra trl-plus[diffusion] (diffusers): {DIFFUSION_INSTALL}")


@dataclass(frozen=True)
class Scoring:
    """How the trainer scores a batch (the method's defaults; the recipe's ``training`` block may override
    ``share_timestep`` / ``share_noise``).

    - ``targets``: the prediction targets the loss is valid for (a scheduler whose target is not among them is
      refused before any model loads);
    - ``share_timestep`` / ``share_noise``: the K images of one example get the same t / the same ε (Diffusion-DPO
      shares both; RankDPO t only; DSO neither ε);
    - caption dropout is always shared by the example's images (both members of a pair drop their prompt);
    - ``segments``: per-segment scores of video latents ``[C, F, h, w]`` (DenseDPO): the name of an example field
      holding each latent frame's segment id (a list of F ints, 0..S−1; −1 leaves a frame out, see
      :func:`~trl_plus.diffusion.data.segment_ids`), collated to ``[B, F]``; the loss then receives ℓ ``[K, B, S]``
      (element means over each segment's frames) with ``mask`` 1 where a segment has frames, and
      ``ctx.outputs.mse`` ``[K*B, S]``. ``None`` (the default): one score per image;
    - ``denoisers``: the denoiser kinds the method can drive (a UNet-only branch, a video-only loss), or ``None``;
    - ``source``: where x_t comes from: ``forward`` (the default: forward-noised clean latents) or ``transitions``
      (stored sampler steps of an online method: each example holds ``transition`` = ``{"x_t", "x_prev",
      "timestep", "prev_timestep"}`` ``[K, ...]`` and ℓ is the element-mean DDIM step log-density of x_prev under
      the model's (guided) prediction at x_t: D3PO, SPO).
    """

    targets: tuple[str, ...] = TARGETS
    share_timestep: bool = True
    share_noise: bool = True
    segments: str | None = None
    #: The denoiser kinds the method drives (``unet``, ``sd3``, ``flux``, ``wan``; ``None``: any), checked before any
    #: model loads like ``targets``.
    denoisers: tuple[str, ...] | None = None
    source: str = "forward"


#: ``Scoring.source`` values.
SOURCES = ("forward", "transitions")


@dataclass
class ImageRollouts(GroupedSamples):
    """The images of one rollout stage of an online diffusion method, group-major (prompt ``g``'s rows are
    contiguous), as :meth:`DiffusionMethod.make_examples` sees them.

    - ``prompts``: per row, the text; ``prompt_ids`` ``[N]``: its row in the trainer's text cache;
      ``group`` ``[N]``: the prompt's index in the stage (0 .. Q−1);
    - ``latents`` ``[N, ...]``: the final latents x0, as the denoiser sees latents (scaled; pixels in [-1, 1] for a
      pixel-space model);
    - ``trajectory``: the recorded :class:`~trl_plus.diffusion.sampling.Trajectory` of the N rows (methods with
      ``record``), else ``None``;
    - ``images`` ``[N, C, H, W]`` in [0, 1]: decoded only when a scorer reads pixels, else ``None``;
    - ``scores`` ``[N, S]``, ``weights`` ``[S]``, ``score_names``: the recipe's scorers' outputs and weights;
    - ``columns``: the prompt rows' other data columns, repeated per row.
    """

    prompts: list[str]
    prompt_ids: Any
    group: Any
    latents: Any
    scores: Any
    weights: Any
    score_names: tuple[str, ...] = ()
    trajectory: Any = None
    images: Any = None
    columns: dict[str, list] = field(default_factory=dict)


def denoising_errors(ctx: Any) -> tuple[Any, Any]:
    """``([K, B] policy errors ē (with grad), [K, B] reference errors or None)`` of a diffusion loss context: the
    scorer's raw element-mean errors (``ctx.outputs.mse`` / ``ref_mse``, whatever ``training.weighting`` is), or, for
    a hand-made context without outputs, ē = −ℓ/½ (the default weight) from ``ctx.logps()`` / ``ctx.ref_logps()``.
    For losses printed on raw errors (DSO's mean(e⁺ − e⁻), RankDPO's s = e_θ − e_ref, an SFT term). Per-segment
    scores (``Scoring.segments``): ``[K, B, S]``."""
    outputs = ctx.outputs
    shape = ctx.token_logps.shape[:2]
    if outputs is not None and getattr(outputs, "mse", None) is not None:
        ref, grid = outputs.ref_mse, (*shape, *outputs.mse.shape[1:])
        return outputs.mse.view(grid), None if ref is None else ref.view(grid)
    return -2 * ctx.logps(), None if ctx.ref_token_logps is None else -2 * ctx.ref_logps()


class DiffusionMethod(Method):
    """A method on text-to-image diffusion or flow models (trainer kind ``diffusion``).

    The loss receives ``ctx.token_logps`` ``[K, B, 1]``: ℓ = −w(t)·ē per image (ē: the element-mean squared error of
    the prediction against the target, fp32; w = ½ unless ``training.weighting`` says otherwise), the reference's
    ℓ under no-grad in ``ctx.ref_token_logps``, and the raw score (errors, timesteps, weights) as ``ctx.outputs``
    (a :class:`~trl_plus.diffusion.scorer.ScoreOutput`). ``data_fields`` are image paths relative to the data file.

    Hooks beyond :class:`~trl_plus.Method`'s: :meth:`examples` (rows -> the images of each example; K images, index
    0 the preferred one) and :meth:`prepare_split` (the image checks run before any model loads); for a method that
    conditions the denoiser on more than the prompt through modules of its own (PPD's user branch, an image-prompt
    adapter): :meth:`prepare_denoiser` (add and size the trainable modules), :meth:`additions_off` (the reference
    without them) and :meth:`extra_conditioning` (per-row conditioning from batch fields, for ``denoise()``).

    An **online** method (``needs.rollout`` a :class:`~trl_plus.Rollout`: ``n`` images per prompt, ``decoding`` the
    sampler's ``steps`` / ``eta`` / ``guidance``, ``every``) trains on prompt rows: each micro-batch's prompts are
    sampled (:meth:`rollout`, with trajectories when :attr:`record`), scored by the recipe's image scorers, and
    turned into training rows by :meth:`make_examples`; :meth:`step_end` runs after every optimizer step (lagged and
    EMA copies: ``trainer.parameter_state(name)``).
    """

    trainer: ClassVar[str] = "diffusion"
    family: ClassVar[str] = "diffusion"
    needs: ClassVar[Needs] = Needs(reference="yes", precomputable_reference=False)
    scoring: ClassVar[Scoring] = Scoring()
    data_fields: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    #: The image columns of a row, in order (index 0 the preferred image).
    image_fields: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/diffusion_pairs.jsonl"}
    #: Columns of a row (besides the images and the prompt) collated into ``ctx.batch`` as float tensors ``[B]``.
    batch_fields: ClassVar[tuple[str, ...]] = ()
    #: What ``trl-plus show``'s example recipe sets for the model (a tiny offline pipeline).
    example_model: ClassVar[dict[str, Any]] = {"kind": "diffusion", "name_or_path": "tiny-sd"}

    #: A method that trains nothing (inference-time guidance, Flow-NRG): what to run instead. ``trl-plus train``
    #: refuses its recipe in one line saying so, after the data checks and before any model loads; ``validate`` and
    #: ``show`` treat the recipe as any other.
    inference_only: ClassVar[str | None] = None
    #: Online methods: what ``trl-plus show``'s example recipe samples and scores with (a short sampler, a rule scorer).
    example_rollout: ClassVar[dict[str, Any]] = {"n": 2, "decoding": {"steps": 4}, "scorers": [{"name": "latent-mean"}]}
    #: Online methods: keep each sample's trajectory (per-step latents, predictions, log-densities) in the rollouts.
    record: ClassVar[bool] = False
    #: Online methods: the ``n`` images of one prompt start from the same x_T (D3PO's pairs).
    share_start: ClassVar[bool] = False

    def rollout(self, trainer: Any, prompt_ids: Any) -> ImageRollouts:
        """One rollout stage for the text-cache rows ``prompt_ids`` ``[Q]`` (online methods). Default: the trainer's
        sampler, ``n`` images per prompt from the current policy (:meth:`DiffusionTrainer.sample_rollouts`)."""
        return trainer.sample_rollouts(prompt_ids)

    def make_examples(self, rollouts: ImageRollouts) -> list[dict[str, Any]]:
        """An online method's training rows from one rollout stage: dicts for its batch collator (``prompt_id``,
        ``x0`` ``[K, ...]`` latents, ``transition`` for ``Scoring.source = "transitions"``, batch fields). Default:
        per prompt, the highest-reward image as the chosen and the lowest as the rejected one (ties to the earlier
        sample; a prompt whose images all tie gives no row): online Diffusion-DPO, Flow-GRPO's DPO variant."""
        import torch

        rows = []
        for g in range(rollouts.num_groups):
            best, worst = rollouts.best_and_worst(g)
            if best == worst:  # one image, or all tied
                continue
            rows.append({"prompt_id": int(rollouts.prompt_ids[best]),
                         "x0": torch.stack([rollouts.latents[best], rollouts.latents[worst]])})  # fmt: skip
        return rows

    def state_dict(self) -> dict[str, Any]:
        """State the method keeps between steps that a resumed run needs (a replay buffer): tensors, numbers,
        strings and containers of them; saved in every checkpoint as ``method_state.pt`` when not empty (default:
        none). :meth:`load_state_dict` restores it on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (default: nothing to restore)."""

    def step_end(self, trainer: Any) -> None:
        """Called after every optimizer step of an online run (default: nothing): refresh lagged or EMA copies
        (``trainer.parameter_state(name).update(trainer.policy(), decay)``)."""

    def images(self, row: dict[str, Any]) -> list[str]:
        """The image paths of one row, preferred first (default: :attr:`image_fields`)."""
        return [row[name] for name in self.image_fields]

    def extra_prompts(self, row: dict[str, Any]) -> dict[str, str]:
        """Prompts besides the row's ``prompt`` that the loss conditions on, ``{example key: text}`` (default none):
        the trainer encodes each into the text cache once and stores its cache row under ``key`` in the example, for
        the method's collator and :meth:`score` (ABC's suffixed "less preferred" prompt)."""
        return {}

    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """The recipe's split checked before any model loads (labels, ties, image paths and sizes; one line naming
        file and row) with image paths made absolute. See :func:`trl_plus.diffusion.data.check_image_rows`."""
        from .data import check_image_rows, check_prompt_rows

        if self.needs.rollout is not None:  # online: prompts only (held-out prompts: fixed-seed sample rewards)
            return check_prompt_rows(dataset, recipe, split)
        return check_image_rows(dataset, self, recipe, split)

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """Score the batch yourself (return a :class:`~trl_plus.diffusion.scorer.ScoreOutput` whose rows are
        ``inputs["num_sequences"]`` × B), or ``None`` (the default) for the trainer's
        :class:`~trl_plus.diffusion.scorer.DenoisingScorer` on forward-noised latents. ``model``: the policy as the
        trainer holds it (with grad); ``generator``: the draws' generator (``None`` in training, seeded in evaluation).
        The trainer's pieces are public: ``clean_latents``, ``conditioning``, ``scorer``, ``reference_errors``."""
        return None

    def prepare_denoiser(self, denoiser: Any, examples: Any) -> list[str]:
        """Add the method's own trainable modules to ``denoiser`` and return the names (as ``named_parameters`` gives
        them) of the parameters it added (default: none). The trainer calls it once, after preparing the training
        ``examples`` (so the modules can be sized from the data) and before the reference and the optimizer exist.
        The added parameters train, are saved in every checkpoint and the output as ``method_weights.safetensors``
        (a LoRA, if any, beside them; a frozen base is not saved) and are loaded on resume; with added parameters
        the reference mode ``auto`` is ``adapter``: the denoiser inside :meth:`additions_off` (and its LoRA off).
        A method that adds parameters must leave the base frozen or under LoRA (the trainer refuses otherwise)."""
        return []

    def additions_off(self, denoiser: Any) -> Any:
        """A context manager in which ``denoiser`` acts without the modules :meth:`prepare_denoiser` added (the
        reference of ``adapter`` mode); default: nothing to switch off."""
        return contextlib.nullcontext()

    def extra_conditioning(self, trainer: Any, inputs: Any, cond: dict[str, Any], generator: Any = None) -> dict:
        """Per-row conditioning beyond the prompt's, for ``denoise()``: ``cond`` (the text cache's rows, one per image
        row) extended from the batch ``inputs`` (e.g. ``added``: a UNet's ``added_cond_kwargs`` with IP-Adapter-style
        ``image_embeds``). The policy and the reference receive the same ``cond``; ``generator``: the draws' generator
        (``None`` in training). Default: ``cond`` unchanged."""
        return cond

    def batch_collator(self) -> Any:
        """The collator of prepared examples (default: K images per example stacked sequence-major)."""
        from .data import LatentCollator

        return LatentCollator(self.batch_fields, segments=self.scoring.segments)
