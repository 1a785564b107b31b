"""Tiny offline diffusion pipelines built from configs (seeded): what the ``tiny-sd``, ``tiny-sd3``, ``tiny-flux`` and
``tiny-wan`` model aliases build. 16x16 RGB images, a 2-level VAE (8x8x4 latents), a 2-layer CLIP text encoder (hidden
32, 16 positions) with the character tokenizer of ``tiny-llama``; ``tiny-sd``: a (8, 16)-channel UNet2DConditionModel
and a 1000-step DDPM scheduler (ε-prediction); ``tiny-sd3``: a 1-layer SD3Transformer2DModel, two CLIP encoders (no
T5) and a flow-matching Euler scheduler (shift 3); ``tiny-flux``: a FluxTransformer2DModel with one double- and one
single-stream block (16 input channels: packed 2x2 patches of the 4-channel latents; no guidance embedding), the CLIP
encoder for the pooled text and a 1-layer T5 encoder (d_model 32) for the text tokens, both with the character
tokenizer, and the flow-matching Euler scheduler with FLUX.1's dynamic shifting; ``tiny-wan``: a 1-layer
WanTransformer3DModel (19,296 parameters, the DenseDPO card's CPU fixture), a 2-level AutoencoderKLWan (4 latent
channels; 1 + 4k frames of 16x16 RGB -> 1 + k latent frames of 8x8), a 1-layer UMT5 text encoder (hidden 32) with the
same character tokenizer and a flow-matching Euler scheduler without shift (timestep = 1000·σ)."""

from __future__ import annotations

from pathlib import Path

TEXT_POSITIONS = 16


def _text_parts(projection: bool, count: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TEXT_POSITIONS, projection_dim=32,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return tokenizer, [cls(config) for _ in range(count)]


def _vae(**kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, **kwargs)  # fmt: skip


def tiny_unet(in_channels: int = 4, sample_size: int = 8, cross_attention_dim: int = 32, seed: int = 0, **kwargs):
    """The ``tiny-sd`` denoiser: a (8, 16)-channel UNet2DConditionModel, one cross-attention level (seeded)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    options = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                   block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
                   norm_num_groups=4, attention_head_dim=4)  # fmt: skip
    return UNet2DConditionModel(**{**options, **kwargs})


def tiny_sd3_transformer(in_channels: int = 4, sample_size: int = 8, seed: int = 0):
    """The ``tiny-sd3`` denoiser: a 1-layer SD3Transformer2DModel (patch 2, 2 heads of 8; joint attention 64)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                 caption_projection_dim=16, pooled_projection_dim=64, out_channels=in_channels)


def tiny_flux_transformer(latent_channels: int = 4, seed: int = 0, guidance_embeds: bool = False):
    """The ``tiny-flux`` denoiser: FluxTransformer2DModel, 1 double- + 1 single-stream block, 2 heads of 16 (rope axes
    4/4/8), text 32 (T5) and pooled 32 (CLIP); ``guidance_embeds``: a guidance-distilled variant (FLUX.1-dev)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    from ..models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer, T5EncoderModel(config)


def save_tiny_sd(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Write the ``tiny-sd`` pipeline (``StableDiffusionPipeline``, no safety checker) to ``directory``."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    unet = tiny_unet(seed=seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    tokenizer, (text_encoder,) = _text_parts(projection=False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipeline.save_pretrained(str(directory))
    return str(directory)


def save_tiny_sd3(directory: str | Path, seed: int = 0) -> str:
    """Write the ``tiny-sd3`` pipeline (``StableDiffusion3Pipeline`` without T5) to ``directory``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = tiny_sd3_transformer(seed=seed)
    torch.manual_seed(seed + 1)
    vae = _vae(shift_factor=0.1, scaling_factor=1.5)
    tokenizer, (first, second) = _text_parts(projection=True, count=2)
    pipeline = StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=first, tokenizer=tokenizer,
                                        text_encoder_2=second, tokenizer_2=tokenizer, text_encoder_3=None,
                                        tokenizer_3=None,
                                        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    pipeline.save_pretrained(str(directory))
    return str(directory)


def tiny_wan_transformer(in_channels: int = 4, seed: int = 0):
    """The ``tiny-wan`` denoiser: a 1-layer WanTransformer3DModel (patch (1, 2, 2), 2 heads of 12, text dim 32;
    19,296 parameters, the DenseDPO card's CPU fixture) on video latents ``[N, C, F, h, w]`` (seeded)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)  # fmt: skip


def save_tiny_wan(directory: str | Path, seed: int = 0) -> str:
    """Write the ``tiny-wan`` pipeline (``WanPipeline``: transformer, VAE, UMT5 text encoder, scheduler) to
    ``directory``."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from ..models.tiny import build_tokenizer

    transformer = tiny_wan_transformer(seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=UMT5EncoderModel(config), vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                           transformer=transformer)  # fmt: skip
    pipeline.save_pretrained(str(directory))
    return str(directory)


def save_tiny_flux(directory: str | Path, seed: int = 0, guidance_embeds: bool = False) -> str:
    """Write the ``tiny-flux`` pipeline (``FluxPipeline``: CLIP for the pooled text, T5 for the tokens) to
    ``directory``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux_transformer(seed=seed, guidance_embeds=guidance_embeds)
    torch.manual_seed(seed + 1)
    vae = _vae(shift_factor=0.1, scaling_factor=1.5)
    tokenizer, (clip,) = _text_parts(projection=False)
    tokenizer_2, t5 = _tiny_t5()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # fmt: skip
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                            tokenizer_2=tokenizer_2, transformer=transformer)  # fmt: skip
    pipeline.save_pretrained(str(directory))
    return str(directory)
