"""A diffusion method's own modules and extra conditioning (``DiffusionMethod.prepare_denoiser`` / ``additions_off`` /
``extra_conditioning``): the added parameters alone train and are saved (``method_weights.safetensors``, no base)
and resumed, the ``auto`` reference is the denoiser with them off, the conditioning hook reaches ``denoise()``, and a
method that leaves the base trainable beside its modules is refused."""

from __future__ import annotations

import contextlib
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trl_plus import DiffusionDPO, TrlPlusError  # noqa: E402
from trl_plus.testing import diffusion_batch, diffusion_loss, tiny_diffusion_trainer  # noqa: E402


class OutputShift(DiffusionDPO):
    """A toy: a zero-initialised per-channel shift on the UNet's output, scaled per row by the batch field ``gain``."""

    name = "test-output-shift"
    batch_fields = ("gain",)
    freeze_base = True

    def prepare_denoiser(self, denoiser, examples):
        denoiser.requires_grad_(not self.freeze_base)
        denoiser.shift = torch.nn.Parameter(torch.zeros(denoiser.config.out_channels))
        self.active, self.gains = True, None

        def hook(module, args, output):
            if not self.active:
                return output
            return output + self.gains.view(-1, 1, 1, 1) * denoiser.shift.view(1, -1, 1, 1)

        denoiser.conv_out.register_forward_hook(hook)
        return ["shift"]

    def additions_off(self, denoiser):
        @contextlib.contextmanager
        def off():
            self.active = False
            try:
                yield denoiser
            finally:
                self.active = True

        return off()

    def extra_conditioning(self, trainer, inputs, cond, generator=None):
        self.gains = inputs["gain"][inputs["group"]]  # the rows' gains, as a method would build per-row conditioning
        return cond


def rows(n=4):
    from trl_plus.testing import diffusion_rows

    return [dict(row, gain=float(i % 2)) for i, row in enumerate(diffusion_rows(n))]


def test_the_added_parameters_train_alone_are_saved_and_resumed(tmp_path):
    from trl_plus.testing import registered

    with registered(OutputShift):
        trainer = tiny_diffusion_trainer("test-output-shift", tmp_path, rows=rows(), batch_size=4, max_steps=2,
                                         learning_rate=1e-2, training={"save_strategy": "steps", "save_steps": 2})
        assert trainer.reference_mode == "adapter" and trainer.added_parameters == ["shift"]
        assert diffusion_loss(trainer, diffusion_batch(trainer)).loss.item() == pytest.approx(math.log(2), abs=1e-7)
        trainer.train()
        shift = trainer.model.shift.detach().clone()
        assert shift.abs().sum() > 0
        with torch.no_grad(), trainer.reference_denoiser():
            assert not trainer.method.active  # the reference: the shift switched off
        assert trainer.method.active
        checkpoint = tmp_path / "checkpoint-2"
        assert (checkpoint / "method_weights.safetensors").is_file() and not (checkpoint / "unet").exists()
        again = tiny_diffusion_trainer("test-output-shift", tmp_path / "again", rows=rows(), batch_size=4)
        again._load_from_checkpoint(str(checkpoint))
        assert torch.equal(again.model.shift.detach(), shift)


def test_a_trainable_base_beside_added_modules_is_refused(tmp_path):
    from trl_plus.testing import registered

    class Unfrozen(OutputShift):
        name = "test-output-shift-unfrozen"
        freeze_base = False

    with registered(Unfrozen), pytest.raises(TrlPlusError, match="must freeze the base"):
        tiny_diffusion_trainer("test-output-shift-unfrozen", tmp_path, rows=rows())
