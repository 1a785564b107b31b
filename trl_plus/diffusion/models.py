"""Diffusion pipelines as trl-plus loads them: a pipeline folder (or alias) -> a :class:`DiffusionBundle`; the
denoiser adapters of :func:`denoise` (UNet2DCondition, SD3, Flux: packed 2x2 latent patches as tokens with their
position ids, σ as the timestep, the guidance embedding of guidance-distilled transformers); LoRA on the attention projections through diffusers' ``add_adapter``; 4-bit
NF4 (diffusers' ``BitsAndBytesConfig`` on a GPU, :func:`quantize_nf4` on a CPU, where diffusers refuses); the LoRA
saved in diffusers' format, so ``pipeline.load_lora_weights`` reads it.

Reading a folder's ``model_index.json`` / component configs (:func:`pipeline_facts`) needs neither torch nor
diffusers: validation uses it before any model loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrlPlusError

logger = logging.getLogger(__name__)

#: Denoiser classes :func:`denoise` drives -> what they predict with.
DENOISERS = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
}
#: The guidance scale a guidance-distilled Flux transformer (``guidance_embeds``) is trained with when the
#: conditioning names none (diffusers' DreamBooth Flux LoRA example's ``--guidance_scale`` default).
FLUX_TRAINING_GUIDANCE = 3.5
#: The LoRA targets of diffusers' training examples (Diffusion-DPO, DreamBooth): the attention projections.
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
#: Flow-matching schedulers (target: the flow velocity ε − x0).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: The ``prediction_type`` of multistep samplers run on flow sigmas (Wan's ``UniPCMultistepScheduler``): the model
#: predicts the flow velocity; training draws from a :func:`training_scheduler` instead.
FLOW_PREDICTION = "flow_prediction"
LORA_FILE = "pytorch_lora_weights.safetensors"
#: The parameters a method added to the denoiser (``DiffusionMethod.prepare_denoiser``), by their parameter names.
METHOD_WEIGHTS_FILE = "method_weights.safetensors"
#: Pipelines whose denoiser class is supported but whose conditioning trl-plus does not build yet.
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXLPipeline": "its UNet needs pooled text embeddings and time_ids (added_cond_kwargs), which "
                                 "trl-plus does not build yet (SD 1.x/2.x and SD3 pipelines are supported)",
}


@dataclass(frozen=True)
class PipelineFacts:
    """What a pipeline folder says about itself (from its JSON files only)."""

    pipeline_class: str
    denoiser: str  # the subfolder: "unet" or "transformer"
    denoiser_class: str
    scheduler_class: str
    prediction_type: str  # epsilon / v_prediction / sample / flow
    components: dict[str, Any] = field(default_factory=dict)  # model_index.json


def pipeline_facts(path: str | Path, denoiser: str | None = None, scheduler: str = "scheduler") -> PipelineFacts:
    """Read ``model_index.json`` and the denoiser's and scheduler's configs of a pipeline folder; one-line errors
    for a folder that is not a diffusers pipeline or a denoiser subfolder it lacks."""
    folder = Path(path).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise TrlPlusError(f"model.name_or_path: {folder} has no model_index.json, so it is not a diffusers pipeline "
                           "folder (give the folder pipeline.save_pretrained wrote, or an alias: tiny-sd, tiny-sd3, "
                           "tiny-flux, tiny-wan)")  # fmt: skip
    index = json.loads(index_file.read_text())
    names = [n for n in ("unet", "transformer") if isinstance(index.get(n), list) and index[n][0]]
    if denoiser is None:
        if not names:
            raise TrlPlusError(f"model.denoiser: {folder} has neither a unet nor a transformer component: name the "
                               "denoiser's subfolder")  # fmt: skip
        denoiser = names[0]
    if not (folder / denoiser / "config.json").is_file():
        raise TrlPlusError(f"model.denoiser: {folder} has no {denoiser}/config.json (its components: "
                           f"{', '.join(k for k, v in index.items() if isinstance(v, list) and v[0])})")  # fmt: skip
    config = json.loads((folder / denoiser / "config.json").read_text())
    denoiser_class = config.get("_class_name") or (index.get(denoiser) or [None, "?"])[1]
    scheduler_file = folder / scheduler / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise TrlPlusError(f"model.scheduler.subfolder: {folder} has no {scheduler}/scheduler_config.json")
    scheduler_config = json.loads(scheduler_file.read_text())
    scheduler_class = scheduler_config.get("_class_name", "?")
    prediction = "flow" if scheduler_class in FLOW_SCHEDULERS else scheduler_config.get("prediction_type", "epsilon")
    prediction = "flow" if prediction == FLOW_PREDICTION else prediction
    pipeline_class = index.get("_class_name", "?")
    if pipeline_class in UNSUPPORTED_PIPELINES:
        raise TrlPlusError(f"model.name_or_path: {folder} is a {pipeline_class}: {UNSUPPORTED_PIPELINES[pipeline_class]}")
    return PipelineFacts(pipeline_class, denoiser, denoiser_class, scheduler_class, prediction, index)


def check_denoiser_class(name: str, where: str = "model.denoiser") -> str:
    """The adapter kind of a denoiser class name; a one-line error naming an unsupported class."""
    if name not in DENOISERS:
        raise TrlPlusError(f"{where}: denoiser class {name} is not supported (supported: {', '.join(DENOISERS)})")
    return DENOISERS[name]


def denoiser_kind(model) -> str:
    """The adapter kind of a denoiser instance (its class or a base class named in :data:`DENOISERS`)."""
    for cls in type(model).__mro__:
        if cls.__name__ in DENOISERS:
            return DENOISERS[cls.__name__]
    return check_denoiser_class(type(model).__name__)


def denoise(model, x_t, timesteps, cond: dict[str, Any]):
    """The denoiser's prediction for ``x_t`` ``[N, C, h, w]`` (Wan: video latents ``[N, C, F, h, w]``) at model
    ``timesteps`` ``[N]`` under ``cond`` (``text`` ``[N, L, H]``; SD3 and Flux: ``pooled`` ``[N, D]``; UNets: ``added``
    = ``added_cond_kwargs``, e.g. SDXL's or an IP-Adapter-style branch's ``image_embeds``; Flux: ``guidance`` ``[N]`` or
    a number), shaped like ``x_t``. UNet2DCondition takes the DDPM index; SD3 and Wan 1000·σ (the flow scheduler's
    timesteps table: WanPipeline passes ``scheduler.timesteps`` entries, one per video; Wan's text is the UMT5
    sequence, no pooled vector); Flux σ. ``model`` may be wrapped for distributed training (DDP): the wrapper is
    called (its gradient hooks), the module inside says which denoiser it is."""
    inner = _unwrapped(model)
    kind = denoiser_kind(inner)
    if kind == "unet":
        return model(x_t, timesteps, encoder_hidden_states=cond["text"], added_cond_kwargs=cond.get("added"),
                     return_dict=False)[0]  # fmt: skip
    if kind == "flux":
        return _denoise_flux(model, x_t, timesteps, cond)
    if kind == "wan":
        return model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["text"], return_dict=False)[0]
    return model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["text"],
                 pooled_projections=cond["pooled"], return_dict=False)[0]  # fmt: skip


def _unwrapped(model):
    """The module inside a ``torch.nn.parallel.DistributedDataParallel`` wrapper (else ``model``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _denoise_flux(model, x_t, timesteps, cond: dict[str, Any]):
    """Flux as diffusers' ``FluxPipeline`` and DreamBooth Flux example call it: ``x_t`` packed into 2x2 patches
    ``[N, h/2·w/2, 4C]`` with their (0, row, column) position ids, text ids all zero, timestep σ = timesteps / 1000,
    guidance ``cond["guidance"]`` (default :data:`FLUX_TRAINING_GUIDANCE`) when the config has the guidance
    embedding; the packed prediction is unpacked to ``[N, C, h, w]``."""
    import torch
    from diffusers import FluxPipeline

    n, c, h, w = x_t.shape
    if h % 2 or w % 2:
        raise TrlPlusError(f"a Flux transformer packs 2x2 latent patches: latents {h}x{w} must have even sides "
                           "(set model.resolution to a multiple of 2x the VAE's downsampling)")  # fmt: skip
    packed = FluxPipeline._pack_latents(x_t, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype)
    txt_ids = torch.zeros(cond["text"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    guidance = None
    if _unwrapped(model).config.guidance_embeds:
        guidance = torch.as_tensor(cond.get("guidance", FLUX_TRAINING_GUIDANCE), dtype=x_t.dtype, device=x_t.device)
        guidance = guidance.expand(n) if guidance.dim() == 0 else guidance
    out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, encoder_hidden_states=cond["text"],
                pooled_projections=cond["pooled"], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


@dataclass
class DiffusionBundle:
    """A loaded pipeline, split for training: the trained ``denoiser``, its frozen ``vae`` (``None``: pixel space)
    and the ``pipeline`` (text encoders, tokenizers: frozen; ``None`` when prompts come encoded), the training
    ``scheduler`` and how the denoiser was quantized (``"diffusers-bnb"``, ``"cpu-nf4-swap"`` or ``None``)."""

    denoiser: Any
    scheduler: Any
    vae: Any = None
    pipeline: Any = None
    quantization: str | None = None
    lora: bool = False
    name: str = ""

    @property
    def kind(self) -> str:
        return denoiser_kind(self.denoiser)


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _cast(module, dtype):
    """``module`` in ``dtype``, cast only when that changes something (diffusers warns on every ``.to(dtype)``)."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module


def load_diffusion(spec, path: str, *, trainable: bool = True) -> DiffusionBundle:
    """Load the pipeline folder ``path`` as the recipe's ``model`` block ``spec`` says: the denoiser in
    ``spec.dtype`` (4-bit when ``spec.quantization`` asks), the VAE and text encoders frozen, LoRA attached when
    ``spec.lora`` is set."""
    import copy

    import torch
    from diffusers import DiffusionPipeline

    facts = pipeline_facts(path, spec.denoiser, spec.scheduler.subfolder if spec.scheduler else "scheduler")
    check_denoiser_class(facts.denoiser_class)
    missing = {k: None for k, v in facts.components.items() if isinstance(v, list) and v[0] is None}
    text_dtype = _dtype(spec.text_encoders.dtype if spec.text_encoders else None) or torch.float32
    pipeline = DiffusionPipeline.from_pretrained(path, dtype=text_dtype, **missing)
    pipeline.set_progress_bar_config(disable=True)
    denoiser = getattr(pipeline, facts.denoiser)
    _cast(denoiser, _dtype(spec.dtype) or torch.float32)
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        vae_dtype = _dtype(spec.vae.dtype if spec.vae else None) or torch.float32
        _cast(vae, vae_dtype).requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipeline, name, None) is not None:
            getattr(pipeline, name).requires_grad_(False).eval()
    quantization = None
    if spec.quantization is not None and spec.quantization.load_in_4bit:
        denoiser, quantization = quantize_denoiser(denoiser, path, facts, spec)
        setattr(pipeline, facts.denoiser, denoiser)
    if spec.lora is not None:
        add_lora(denoiser, spec.lora)
    elif not trainable:
        denoiser.requires_grad_(False).eval()
    scheduler = training_scheduler(copy.deepcopy(pipeline.scheduler))
    return DiffusionBundle(denoiser, scheduler, vae, pipeline, quantization, spec.lora is not None, str(path))


def training_scheduler(scheduler):
    """The scheduler the scorer draws from: ``scheduler`` itself, except a multistep sampler on flow sigmas
    (``prediction_type: flow_prediction``, as Wan's ``UniPCMultistepScheduler``), whose σ/timestep tables exist only
    after ``set_timesteps``: it becomes the ``FlowMatchEulerDiscreteScheduler`` of the same training steps and
    shift (``flow_shift``), timestep = 1000·σ as WanPipeline feeds the transformer."""
    if type(scheduler).__name__ in FLOW_SCHEDULERS or scheduler.config.get("prediction_type") != FLOW_PREDICTION:
        return scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler.config.num_train_timesteps,
                                           shift=scheduler.config.get("flow_shift") or 1.0)


def quantize_denoiser(denoiser, path: str, facts: PipelineFacts, spec) -> tuple[Any, str]:
    """4-bit NF4 denoiser: diffusers' ``BitsAndBytesConfig`` load on a GPU (then peft's
    ``prepare_model_for_kbit_training``), :func:`quantize_nf4` on a CPU (diffusers refuses: "No GPU found")."""
    import torch

    compute = _dtype(spec.quantization.compute_dtype) or torch.float32
    if torch.cuda.is_available():
        import diffusers
        from diffusers import BitsAndBytesConfig
        from peft import prepare_model_for_kbit_training

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantization.quant_type,
                                    bnb_4bit_use_double_quant=spec.quantization.double_quant,
                                    bnb_4bit_compute_dtype=compute)  # fmt: skip
        cls = getattr(diffusers, facts.denoiser_class)
        model = cls.from_pretrained(path, subfolder=facts.denoiser, quantization_config=config, dtype=compute)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        logger.info("model.quantization: the denoiser is 4-bit through diffusers' BitsAndBytesConfig (GPU)")
        return model, "diffusers-bnb"
    quantize_nf4(denoiser, compute_dtype=torch.float32 if compute == torch.bfloat16 else compute,
                 quant_type=spec.quantization.quant_type)  # fmt: skip
    logger.info("model.quantization: the denoiser's transformer-block linears are NF4 through the CPU swap to "
                "bitsandbytes Linear4bit (diffusers' BitsAndBytesConfig needs a GPU)")  # fmt: skip
    return denoiser, "cpu-nf4-swap"


#: Where a denoiser's transformer blocks live, by module-name prefix or part: UNet attentions, SD3 and Flux
#: (``transformer_blocks``, ``single_transformer_blocks``), Wan (``blocks.N``).
TRANSFORMER_BLOCKS = ("transformer_blocks", "blocks.")


def _in_blocks(name: str, inside: str | tuple[str, ...]) -> bool:
    parts = (inside,) if isinstance(inside, str) else inside
    return any(name.startswith(part) if part.endswith(".") else part in name for part in parts)


def quantize_nf4(model, compute_dtype=None, quant_type: str = "nf4",
                 inside: str | tuple[str, ...] = TRANSFORMER_BLOCKS) -> int:  # fmt: skip
    """Swap every ``nn.Linear`` inside the denoiser's transformer blocks (``inside``: name parts, or prefixes when
    they end with ".") for a bitsandbytes ``Linear4bit`` holding the same weight quantized (``Params4bit``, on the
    CPU): the CPU path of a 4-bit denoiser. Returns how many it swapped."""
    import bitsandbytes as bnb
    import torch

    compute_dtype = compute_dtype or torch.float32
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and _in_blocks(name, inside)]  # fmt: skip
    for name, linear in targets:
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type)  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.float32).cpu(), requires_grad=False,
                                             quant_type=quant_type)  # fmt: skip
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        quantized = quantized.to("cpu")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return len(targets)


def add_lora(denoiser, lora) -> None:
    """A LoRA adapter on the denoiser through diffusers' ``add_adapter`` (``target_modules: all-linear``, the text
    default, means the attention projections here); only its parameters train, in fp32."""
    from peft import LoraConfig

    targets = lora.target_modules
    if targets == "all-linear":
        targets = ATTENTION_PROJECTIONS
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    init_lora_weights="gaussian", target_modules=targets))  # fmt: skip
    for name, parameter in denoiser.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)


def has_lora(denoiser) -> bool:
    """Whether the denoiser carries a peft adapter (diffusers' ``add_adapter``)."""
    return bool(getattr(denoiser, "_hf_peft_config_loaded", False))


def _lora_mixin(denoiser):
    from diffusers.loaders import (
        FluxLoraLoaderMixin,
        SD3LoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        WanLoraLoaderMixin,
    )

    kind = denoiser_kind(denoiser)
    if kind == "unet":
        return StableDiffusionLoraLoaderMixin, "unet"
    return {"flux": FluxLoraLoaderMixin, "wan": WanLoraLoaderMixin}.get(kind, SD3LoraLoaderMixin), "transformer"


def denoiser_subfolder(denoiser) -> str:
    """The pipeline subfolder a denoiser lives in (``unet`` or ``transformer``)."""
    return _lora_mixin(denoiser)[1]


def save_denoiser(denoiser, output_dir: str | Path) -> None:
    """The trained weights in ``output_dir``: a LoRA as ``pytorch_lora_weights.safetensors`` in diffusers' format
    (``pipeline.load_lora_weights(output_dir)`` reads it); a fully trained denoiser as its own folder
    (``<unet|transformer>/``, ``from_pretrained`` reads it)."""
    from peft.utils import get_peft_model_state_dict

    mixin, prefix = _lora_mixin(denoiser)
    if has_lora(denoiser):
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        mixin.save_lora_weights(str(output_dir), **{f"{prefix}_lora_layers": layers})
    else:
        denoiser.save_pretrained(str(Path(output_dir) / prefix))


def complete_pipeline(source: str | Path, output_dir: str | Path, denoiser: str) -> bool:
    """Make ``output_dir`` (holding a fully trained ``<denoiser>/``) a pipeline folder a recipe can name as
    ``model.name_or_path``: ``model_index.json`` and every other component folder of the ``source`` pipeline, hard
    linked where the file system allows (no copy of a large VAE or text encoder), else copied. Returns whether it did
    (``False`` when ``source`` is not a pipeline folder)."""
    import os
    import shutil

    source, output_dir = Path(source), Path(output_dir)
    index_file = source / "model_index.json"
    if not index_file.is_file():
        return False

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    index = json.loads(index_file.read_text())
    for name, value in index.items():
        if name == denoiser or not (isinstance(value, list) and value[0]) or not (source / name).is_dir():
            continue
        shutil.copytree(source / name, output_dir / name, copy_function=link, dirs_exist_ok=True)
    shutil.copy2(index_file, output_dir / "model_index.json")
    return True


def load_denoiser_weights(denoiser, folder: str | Path) -> None:
    """Load what :func:`save_denoiser` wrote (a checkpoint being resumed) into ``denoiser``."""
    from safetensors.torch import load_file

    _, prefix = _lora_mixin(denoiser)
    if has_lora(denoiser):
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state = load_file(str(Path(folder) / LORA_FILE))
        state = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
        set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(state), adapter_name="default")
        return
    weights = sorted((Path(folder) / prefix).glob("*.safetensors"))
    state = {}
    for file in weights:
        state.update(load_file(str(file)))
    denoiser.load_state_dict(state)


def save_added_parameters(denoiser, names: list[str], output_dir: str | Path) -> None:
    """The parameters ``names`` of ``denoiser`` (a method's added modules) as ``method_weights.safetensors``."""
    from safetensors.torch import save_file

    parameters = dict(denoiser.named_parameters())
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_file({name: parameters[name].detach().cpu().contiguous() for name in names},
              str(Path(output_dir) / METHOD_WEIGHTS_FILE))  # fmt: skip


def load_added_parameters(denoiser, names: list[str], folder: str | Path) -> None:
    """Load what :func:`save_added_parameters` wrote into ``denoiser``; one line when the file lacks a parameter."""
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / METHOD_WEIGHTS_FILE
    state = load_file(str(path)) if path.is_file() else {}
    missing = [name for name in names if name not in state]
    if missing:
        raise TrlPlusError(f"{path}: lacks the method's parameters {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''} (a checkpoint of another method or setup?)")
    parameters = dict(denoiser.named_parameters())
    with torch.no_grad():
        for name in names:
            parameters[name].copy_(state[name])
