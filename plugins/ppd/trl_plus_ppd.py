"""PPD — Personalized Preference Fine-tuning of Diffusion Models (arXiv 2501.06655, CVPR 2025; Dang, Singh, Zhou,
Ermon, Song; official code not found). Diffusion-DPO whose policy is conditioned on a per-user embedding e_u through
new decoupled cross-attention layers (IP-Adapter style) in each text cross-attention block of the UNet:

    Z′ = softmax(Q·Kᵀ/√d)·V + softmax(Q·K′ᵀ/√d)·V′,   K′ = e_u·W′_k,  V′ = e_u·W′_v

Only W′_k, W′_v train; W′_v starts at zero, so the policy is the base at initialisation. The reference is the base
without the branch (the paper does not say; inferred). The loss is Diffusion-DPO's (official convention: element-mean
errors, z = −β/2·Δ, β 5000), t and ε shared by winner and loser:

    L = −log σ(−β/2·[(ē_θ(x⁺, c, u) − ē_ref(x⁺, c)) − (ē_θ(x⁻, c, u) − ē_ref(x⁻, c))])

The branch is diffusers' own ``IPAdapterAttnProcessor2_0`` on every ``attn2`` (cross-attention) processor, with
``cross_attention_dim`` = the user embedding's width D (W′ maps e_u directly, no projection, as the card's formula),
an identity ``encoder_hid_proj`` and the embedding passed as ``added_cond_kwargs["image_embeds"]``; the reference sets
the processors' ``scale`` to 0, which skips the branch. A zero e_u gives K′ = V′ = 0 and an added term of exactly 0
(no bias anywhere in the branch): user-embedding dropout (``user_dropout``, default 0.1, rate not found: inferred)
zeroes the embedding of a whole example, so those examples train the base's behaviour.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pydantic import Field

from trl_plus import (
    DiffusionDPO,
    DiffusionDPOConfig,
    Needs,
    Paper,
    Scoring,
    TrlPlusError,
    hookimpl,
)

#: The row field holding the user embedding: a list of D floats (one token), a list of T lists of D floats (a token
#: sequence, e.g. a VLM's hidden states), or a path (relative to the data file) to a ``.npy`` / ``.pt`` file of
#: shape [D] or [T, D].
USER_FIELD = "user_embedding"
EMBEDDING_FILES = (".npy", ".pt")


class PPDConfig(DiffusionDPOConfig):
    """PPD hyperparameters: Diffusion-DPO's (β 5000, sigmoid; the paper gives no β) and the user-embedding dropout."""

    user_dropout: float = Field(0.1, ge=0, lt=1, description="probability an example's user embedding is zeroed in "
                                                             "training (used by the paper; rate not found: inferred)")
    seed: int = Field(0, description="seed of W′_k's initialisation (nn.Linear's default; W′_v starts at zero)")


def read_user_embedding(value: Any, base: Path | None = None):
    """A user embedding as a float32 tensor ``[T, D]``: a list of floats (T = 1), a list of lists, a tensor or array,
    or a ``.npy`` / ``.pt`` file (relative paths against ``base``). Raises ``ValueError`` saying what is wrong."""
    import numpy as np
    import torch

    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if path.suffix not in EMBEDDING_FILES:
            raise ValueError(f"{path} is not a .npy or .pt file")
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        value = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
    try:
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32) if not torch.is_tensor(value) else value)
    except (TypeError, ValueError):
        raise ValueError("must be numbers: a list of D floats, a list of T lists of D floats, or a .npy/.pt path")
    tensor = tensor.float()
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.numel() == 0:
        raise ValueError(f"must have shape [D] or [T, D], got {list(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("holds a NaN or an infinity")
    return tensor


class PPDCollator:
    """The core's latent collator plus ``user_embedding`` ``[B, T, D]`` (files read once, cached by path)."""

    def __init__(self):
        from trl_plus import LatentCollator

        self.latents = LatentCollator()
        self.cache: dict[str, Any] = {}

    def embedding(self, value):
        if isinstance(value, (str, Path)):
            key = str(value)
            if key not in self.cache:
                self.cache[key] = read_user_embedding(key)
            return self.cache[key]
        return read_user_embedding(value)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.latents([{k: v for k, v in e.items() if k != USER_FIELD} for e in examples])
        batch[USER_FIELD] = torch.stack([self.embedding(e[USER_FIELD]) for e in examples])
        return batch


def branch_processors(denoiser):
    """The user branch's attention processors (diffusers' ``IPAdapterAttnProcessor2_0``) of a prepared UNet."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return [p for p in denoiser.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]


def add_user_branch(denoiser, tokens: int, width: int, seed: int = 0) -> list[str]:
    """Decoupled cross-attention on every ``attn2`` processor of a UNet2DConditionModel: W′_k (nn.Linear's default
    initialisation, seeded) and W′_v = 0 mapping ``width``-dim user tokens to the layer's key/value width; an
    identity ``encoder_hid_proj``; the base frozen. Returns the branch's parameter names."""
    import torch
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    processors = {}
    generator = torch.Generator().manual_seed(seed)
    for name, processor in denoiser.attn_processors.items():
        if not name.endswith("attn2.processor"):
            processors[name] = processor
            continue
        attention = denoiser.get_submodule(name.removesuffix(".processor"))
        branch = IPAdapterAttnProcessor2_0(hidden_size=attention.to_k.out_features, cross_attention_dim=width,
                                           num_tokens=(tokens,), scale=1.0)  # fmt: skip
        bound = 1 / width**0.5  # nn.Linear's default (kaiming_uniform with a = √5), drawn from the seeded generator
        with torch.no_grad():
            branch.to_k_ip[0].weight.uniform_(-bound, bound, generator=generator)
            branch.to_v_ip[0].weight.zero_()
        processors[name] = branch
    if not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in processors.values()):
        raise TrlPlusError("ppd: the UNet has no cross-attention (attn2) layers to add the user branch to")
    denoiser.requires_grad_(False)
    denoiser.set_attn_processor(processors)
    denoiser.encoder_hid_proj = MultiIPAdapterImageProjection([torch.nn.Identity()])
    denoiser.register_to_config(encoder_hid_dim_type="ip_image_proj")
    device = next(denoiser.parameters()).device
    names = []
    for name, parameter in denoiser.named_parameters():
        if ".to_k_ip." in name or ".to_v_ip." in name:
            parameter.data = parameter.data.to(device=device, dtype=torch.float32)
            parameter.requires_grad_(True)
            names.append(name)
    return names


class PPD(DiffusionDPO):
    """Diffusion-DPO on a UNet with a trained user-embedding cross-attention branch; reference = the branch off."""

    name = "ppd"
    taxonomy = {"data.quality": "heterogeneity", "data.feedback": "pair", "learning.paradigm": "offline",
                "constraint.reference": "fixed", "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Personalized Preference Fine-tuning of Diffusion Models", "2501.06655")
    summary = ("Diffusion-DPO with a per-user embedding in new decoupled cross-attention layers (only W′_k, W′_v "
               "train), reference = the branch off, β 5000")  # fmt: skip
    needs = Needs(reference="yes", fields=(USER_FIELD,), precomputable_reference=False)
    scoring = Scoring(share_timestep=True, share_noise=True, denoisers=("unet",))  # the branch: UNet attn2 layers
    Config = PPDConfig
    batch_fields = (USER_FIELD,)
    example_data = {"path": "recipes/data/diffusion_user_pairs.jsonl"}

    # -- before any model loads ----------------------------------------------------------------------------------
    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """The core's image checks, and: no ``model.lora`` (only the branch trains), reference ``auto`` or
        ``adapter``, and every row's ``user_embedding`` readable with one shape [T, D] (file paths made absolute)."""
        spec = getattr(recipe.data, split)
        source = f"{getattr(recipe, '_source', '<recipe>')}: data.{split} ({spec.path})"
        if getattr(recipe.model, "lora", None) is not None:
            raise TrlPlusError(f"{getattr(recipe, '_source', '<recipe>')}: model.lora: ppd trains only its user branch "
                               "(W′_k, W′_v) on a frozen base; remove model.lora")  # fmt: skip
        mode = getattr(getattr(recipe, "reference", None), "mode", "auto")
        if mode not in ("auto", "adapter"):
            raise TrlPlusError(f"{getattr(recipe, '_source', '<recipe>')}: reference.mode: ppd's reference is the "
                               f"base with the user branch off; use auto (got {mode})")  # fmt: skip
        if USER_FIELD not in dataset.column_names:
            raise TrlPlusError(f"{source}: ppd needs a {USER_FIELD!r} column (a list of D floats, T lists of D floats, "
                               f"or a .npy/.pt path per row); the data has {', '.join(dataset.column_names)}")
        base = Path(spec.path).expanduser().resolve().parent if Path(spec.path).is_file() else Path.cwd()
        shape, values = None, []
        for index, value in enumerate(dataset[USER_FIELD]):
            try:
                tensor = read_user_embedding(value, base)
            except ValueError as exc:
                raise TrlPlusError(f"{source}: row {index + 1}: {USER_FIELD} {exc}") from None
            if shape is None:
                shape = tuple(tensor.shape)
            elif tuple(tensor.shape) != shape:
                raise TrlPlusError(f"{source}: row {index + 1}: {USER_FIELD} has shape {list(tensor.shape)} but row 1 "
                                   f"has {list(shape)}: every user embedding needs the same [T, D]")  # fmt: skip
            if isinstance(value, str):
                path = Path(value).expanduser()
                value = str(path if path.is_absolute() else (base / path).resolve())
            values.append(value)
        if isinstance(dataset[USER_FIELD][0] if len(dataset) else None, str):
            dataset = dataset.remove_columns(USER_FIELD).add_column(USER_FIELD, values)
        return super().prepare_split(dataset, recipe, split)

    # -- the branch ------------------------------------------------------------------------------------------------
    def prepare_denoiser(self, denoiser: Any, examples: Any) -> list[str]:
        """The user branch on the UNet's cross-attention layers, sized [T, D] from the first training example."""
        from trl_plus import denoiser_kind, has_lora

        if denoiser_kind(denoiser) != "unet":
            raise TrlPlusError(f"ppd: the user branch is diffusers' IP-Adapter cross-attention of a "
                               f"UNet2DConditionModel; {type(denoiser).__name__} is not one (use an SD 1.x/2.x "
                               "pipeline or tiny-sd)")  # fmt: skip
        if has_lora(denoiser):
            raise TrlPlusError("ppd: model.lora: ppd trains only its user branch on a frozen base; remove model.lora")
        if not examples or USER_FIELD not in examples[0]:
            raise TrlPlusError(f"ppd: the training rows need a {USER_FIELD!r} field to size the user branch")
        tokens, width = read_user_embedding(examples[0][USER_FIELD]).shape
        return add_user_branch(denoiser, tokens, width, seed=self.config.seed)

    def additions_off(self, denoiser: Any) -> Any:
        """The branch off (every branch processor's scale 0: diffusers skips it), restored afterwards."""

        @contextlib.contextmanager
        def off():
            processors = branch_processors(denoiser)
            scales = [p.scale for p in processors]
            for p in processors:
                p.scale = [0.0] * len(p.scale)
            try:
                yield denoiser
            finally:
                for p, scale in zip(processors, scales):
                    p.scale = scale

        return off()

    def extra_conditioning(self, trainer: Any, inputs: Any, cond: dict[str, Any], generator: Any = None) -> dict:
        """Each image row's user embedding as ``added["image_embeds"]`` (``[N, 1, T, D]``: one "image" of T tokens);
        in training, an example's embedding is zeroed with probability ``user_dropout`` (both images together)."""
        import torch

        users = inputs[USER_FIELD]  # [B, T, D]
        if self.config.user_dropout > 0 and trainer.model.training:
            keep = torch.rand(users.size(0), generator=generator) >= self.config.user_dropout
            users = users * keep.to(users.device, users.dtype).view(-1, 1, 1)
        rows = users[inputs["group"].to(users.device)].unsqueeze(1)
        added = dict(cond.get("added") or {})
        added["image_embeds"] = [rows.to(cond["text"].dtype)]
        return {**cond, "added": added}

    def batch_collator(self) -> Any:
        """The core's collator plus the user embeddings ``[B, T, D]``."""
        return PPDCollator()


@hookimpl
def register_methods(register):
    register(PPD)
