"""DDIM inversion (trl_plus.ddim_invert): inverting then sampling deterministically reconstructs the latent on the
tiny UNet (stated tolerance below), exactly when ε does not depend on x, better with ReNoise and with more steps;
per-row stopping levels; recorded steps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from trl_plus import TrlPlusError, ddim_invert, ddim_sample, inversion_timesteps
from trl_plus.testing import tiny_diffusion_bundle, tiny_text_encoder

#: SD's schedule (scaled_linear 0.00085–0.012): the one SmPO and Inversion-DPO invert with.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False)  # fmt: skip
#: The stated tolerance: root-mean-square reconstruction error of unit-variance latents inverted to t = 600 in 50
#: steps on the tiny random UNet (measured 0.0286; ReNoise ×1: 0.0141).
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def setup():
    model = tiny_diffusion_bundle().denoiser.eval()
    cond = {"text": tiny_text_encoder()(["a red circle", "a blue square"])["text"]}
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, DDPMScheduler(**SD_SCHEDULE), cond, x0


def rms(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


def reconstruction(setup, steps, renoise=0, until=600):
    model, scheduler, cond, x0 = setup
    inverted = ddim_invert(model, x0, cond, scheduler, steps, until=until, renoise=renoise)
    return rms(ddim_sample(model, inverted.latent, cond, scheduler, steps, start=until - 1), x0), inverted


def test_invert_then_sample_reconstructs_the_latent(setup):
    plain, inverted = reconstruction(setup, 50)
    assert plain < TOLERANCE
    assert rms(inverted.latent, setup[3]) > 0.5  # it did move toward noise
    renoised, _ = reconstruction(setup, 50, renoise=1)
    assert renoised < 0.6 * plain  # ReNoise's averaged ε is closer to the sampler's
    finer, _ = reconstruction(setup, 100)
    assert finer < 0.6 * plain


def test_exact_when_the_prediction_does_not_depend_on_the_latent(setup):
    model, scheduler, cond, x0 = setup
    model = tiny_diffusion_bundle().denoiser.eval()
    with torch.no_grad():
        model.conv_out.weight.zero_()  # ε = the bias: the same at both latents of every step
    inverted = ddim_invert(model, x0, cond, scheduler, 20, until=1000)
    assert rms(ddim_sample(model, inverted.latent, cond, scheduler, 20), x0) < 1e-4


def test_rows_stop_below_their_own_level_and_steps_are_recorded(setup):
    model, scheduler, cond, x0 = setup
    taus = inversion_timesteps(scheduler, 5)
    assert taus.tolist() == [0, 200, 400, 600, 800]
    inverted = ddim_invert(model, x0, cond, scheduler, 5, until=torch.tensor([0, 500]), record=True)
    assert torch.equal(inverted.latent[0], x0[0])  # no step below t = 0: x̃ = x0
    assert not torch.equal(inverted.latent[1], x0[1])
    assert len(inverted.predictions) == 3 and [s.tolist() for s in inverted.steps] == [[False, True]] * 3
    alone = ddim_invert(model, x0[1:], {"text": cond["text"][1:]}, scheduler, 5, until=500)
    assert torch.allclose(alone.latent, inverted.latent[1:], atol=1e-6)


def test_refuses_what_it_cannot_invert(setup):
    model, _, cond, x0 = setup
    with pytest.raises(TrlPlusError, match="ε-prediction"):
        ddim_invert(model, x0, cond, DDPMScheduler(prediction_type="v_prediction"), 5)
    with pytest.raises(TrlPlusError, match="inversion steps"):
        ddim_invert(model, x0, cond, DDPMScheduler(), 0)
