"""Flow-NRG: the card's worked example through the core's reward_guidance, w = 0 is plain sampling exactly,
linearity in w, no gradient reaches the generator, guidance raises the latent mean of fixed-seed tiny-sd3 samples
(trainer and pipeline alias, PNGs written), and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
import trl_plus_flow_nrg as nrg
from trl_plus_flow_nrg import FlowNRG, guidance_fn, guided_generate

from trl_plus import DiffusionTrainer, Rollout, Scorer, TrlPlusError, get_registry, load_recipe, sample, train
from trl_plus.testing import checked_split, cli, tiny_diffusion_trainer

PROMPTS = ["a red circle", "a blue square"]


class Linear(Scorer):
    """r(x) = x · a (a latent scorer for hand examples)."""

    name, outputs, inputs = "linear", ("r",), "latents"

    def __init__(self, a):
        super().__init__()
        self.a = torch.tensor(a)

    def score(self, prompts, completions, **columns):
        return (completions.flatten(1) * self.a.to(completions.dtype)).sum(1, keepdim=True)


def latent_mean():
    return get_registry().get_scorer("latent-mean")()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    rollout = Rollout(n=1, decoding={"steps": 4, "eta": 0.0, "guidance": 1.0})
    return tiny_diffusion_trainer(FlowNRG, tmp_path_factory.mktemp("nrg"), target="flow",
                                  rows=[{"prompt": p} for p in PROMPTS], rollout=rollout,
                                  scorers=[(latent_mean(), 1.0)])  # fmt: skip


def test_card_worked_example():
    guide = guidance_fn([(Linear([1.0, 0.5]), 0.5), (Linear([-0.4, 0.2]), 0.5)], ["p"])
    x, v = torch.tensor([[0.3, 0.7]]), torch.tensor([[0.2, -0.1]])
    guided = guide(x, torch.tensor([600.0]), v, 0)  # σ = 0.6: σ/(1 − σ) = 1.5, combined ∇r = [0.3, 0.35]
    assert guided.tolist()[0] == pytest.approx([-0.25, -0.625], abs=1e-6)
    assert (x - 0.1 * guided).tolist()[0] == pytest.approx([0.325, 0.7625], abs=1e-6)  # Euler, Δt = 0.1


def test_linear_in_the_weights():
    x, v, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(3, 4, 8, 8), torch.full((3,), 700.0)
    a, b = (torch.randn(4 * 8 * 8, generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 2))

    def shift(scorers):
        return guidance_fn(scorers, ["p"] * 3)(x, t, v, 0) - v

    combined = shift([(Linear(a), 0.3), (Linear(b), -1.7)])
    assert torch.allclose(combined, 0.3 * shift([(Linear(a), 1.0)]) - 1.7 * shift([(Linear(b), 1.0)]), atol=1e-6)
    assert torch.allclose(shift([(Linear(a), 2.0)]), 2 * shift([(Linear(a), 1.0)]), atol=1e-6)


def test_zero_weight_is_plain_sampling_and_no_generator_gradient(trainer):
    plain = guided_generate(trainer, PROMPTS, [("latent-mean", 0.0)], steps=4, seed=3, n=2)
    x_T = trainer.initial_noise(4, torch.Generator().manual_seed(3))
    rows = torch.tensor([trainer.prompt_id(p) for p in PROMPTS]).repeat_interleave(2)
    reference = sample(trainer.policy().eval(), trainer.bundle.scheduler, x_T, trainer.cond(rows), 4, eta=0.0,
                       record=False).latents[-1]  # fmt: skip
    assert torch.equal(plain.latents, reference)
    guided = guided_generate(trainer, PROMPTS, [("latent-mean", 300.0)], steps=4, seed=3, n=2)
    assert not torch.equal(guided.latents, plain.latents)
    assert all(p.grad is None for p in trainer.policy().parameters())


def test_guidance_raises_the_latent_mean(trainer):
    means = [float(guided_generate(trainer, PROMPTS, [("latent-mean", w)], steps=4, seed=7, n=4).rewards[
        "latent-mean"].mean()) for w in (0.0, 100.0, 300.0)]  # fmt: skip
    print("latent mean at w = 0, 100, 300:", means)
    assert means[0] < means[1] < means[2]
    assert means[2] - means[0] > 0.5  # the unguided samples' latent std is ~1


def test_pipeline_alias_writes_pngs(tmp_path):
    done = guided_generate("tiny-sd3", ["a red circle"], [("latent-mean", 200.0)], steps=3, seed=0, n=2,
                           out_dir=tmp_path, resolution=16, dtype="float32")  # fmt: skip
    plain = guided_generate("tiny-sd3", ["a red circle"], [("latent-mean", 0.0)], steps=3, seed=0, n=2,
                            resolution=16, dtype="float32")  # fmt: skip
    assert done.rewards["latent-mean"].mean() > plain.rewards["latent-mean"].mean()
    assert len(done.paths) == 2 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in done.paths)
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 2


def no_model(*args, **kwargs):
    raise AssertionError("a pipeline was loaded")


def test_recipe_runs_and_train_refuses(tmp_path, monkeypatch):
    overrides = ["model.name_or_path=tiny-sd3", "model.dtype=float32", "model.text_encoders.dtype=float32",
                 "model.resolution=16", "rollout.decoding.steps=2", "rollout.decoding.guidance=1.0", "rollout.n=1",
                 "data.train.path=recipes/data/diffusion_prompts.jsonl"]  # fmt: skip
    assert nrg.main(["recipes/flow-nrg.yaml", "--out", str(tmp_path), "--prompt", "a dot",
                     *[f"--set={o}" for o in overrides]]) == 0  # fmt: skip
    assert (tmp_path / "0000.png").is_file()
    assert cli("flow-nrg", "generate", "recipes/flow-nrg.yaml", "--out", str(tmp_path / "cli"), "--prompt", "a dot",
               *[f"--set={o}" for o in overrides]) == 0  # fmt: skip
    assert (tmp_path / "cli" / "0000.png").is_file()
    recipe = load_recipe("recipes/flow-nrg.yaml", [*overrides, f"training.output_dir={tmp_path / 'run'}"])
    assert len(checked_split(recipe)) == 4  # the prompts pass the core's checks ...
    monkeypatch.setattr(DiffusionTrainer, "from_recipe", no_model)
    with pytest.raises(TrlPlusError, match="method 'flow-nrg' trains nothing: generate with trl-plus flow-nrg generate"):
        train(recipe)  # ... and training stops before any model loads


def test_one_line_errors(trainer):
    with pytest.raises(TrlPlusError, match="at least one latent scorer"):
        guided_generate(trainer, PROMPTS, [])
    with pytest.raises(TrlPlusError, match="brightness reads pixels"):
        guided_generate(trainer, PROMPTS, [("brightness", 1.0)])
    with pytest.raises(TrlPlusError, match="not in the trainer's text cache"):
        guided_generate(trainer, ["an unseen prompt"], [("latent-mean", 1.0)])
    with pytest.raises(TrlPlusError, match="trains nothing"):
        FlowNRG().make_examples(None)
    for error in (TrlPlusError("x"),):
        assert "\n" not in str(error)
