"""Diffusion and flow models under the same :class:`~trl_plus.Method` contract (optional extra
``trl-plus[diffusion]``).

A "token" is one denoising score: the trainer fills ``LossContext.token_logps`` ``[K, B, 1]`` with
ℓ = −w(t)·ē, ē the element-mean squared error of the denoiser's prediction against its target (fp32) and w = ½ by
default, so the unchanged ``dpo`` loss with the official β (5000) is the official Diffusion-DPO loss.

- :mod:`.method` (light, no torch): :class:`DiffusionMethod`, :class:`Scoring`, the install line of the extra;
- :mod:`.data`: image rows (paths checked before any model loads), labels and ties, the latent collator;
- :mod:`.models`: pipeline folders, ``denoise()`` per denoiser class (UNet, SD3, Flux), LoRA, the CPU NF4 swap,
  saving LoRA;
- :mod:`.scorer`: the :class:`~trl_plus.diffusion.scorer.DenoisingScorer` (targets, timesteps, sharing, weights);
- :mod:`.inversion`: deterministic DDIM inversion (optional ReNoise averaging) and the matching DDIM sampler;
- :mod:`.sampling`: the recording sampler of online methods (DDIM(η) with step log-densities, flow Euler, guidance
  hooks) and :class:`~trl_plus.diffusion.sampling.ParameterState` (lagged / EMA copies of the trained tensors);
- :mod:`.tiny`: the offline ``tiny-sd`` / ``tiny-sd3`` / ``tiny-flux`` / ``tiny-wan`` pipelines;
- :mod:`.trainer`: ``DiffusionConfig`` and ``DiffusionTrainer`` (``transformers.Trainer``), trainer kind ``diffusion``;
  online methods' rollout stage (prompts -> images -> scores -> the method's rows).

This package's ``__init__`` imports nothing: diffusers and torch load only when a diffusion run needs them.
"""
