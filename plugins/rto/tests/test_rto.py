"""RTO (rto-lite): the card's token rewards (clip, KL, return-to-go) and the design note's per-token advantages,
r_dpo ≡ 0 when π_dpo = π_ref, the [N, T] path through PlusGRPOTrainer equal to A_i + returns computed here, config
errors, and learning from the DPO token reward alone with π_dpo = the tiny model after a few dpo steps on digit
pairs (the sequence reward's weight 0), and the recipe validating."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from pydantic import ValidationError
from trl import GRPOConfig
from trl_plus_rto import RTO, RTOConfig, dpo_token_rewards, kl_token_rewards, returns_to_go

from trl_plus import PlusGRPOTrainer, Rollout, Rollouts, TrlPlusError, get_registry, rollout_token_logps
from trl_plus.testing import build_model, build_tokenizer, save_tiny_adapter, save_tiny_model, train_tiny

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(32)]


def test_card_token_rewards_and_returns():
    old = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -0.4, -1.5]], dtype=torch.float64)
    dpo = torch.tensor([[-0.8, -0.6, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    r_dpo = dpo_token_rewards(dpo, ref, mask, scale=0.05, clip=0.05)
    assert r_dpo.tolist()[0] == pytest.approx([0.02, -0.01, 0.05], abs=1e-12)  # the third clipped from 0.075
    assert dpo_token_rewards(dpo, ref, mask, 0.05, 0.0).tolist()[0][2] == pytest.approx(0.075)  # c = 0: no clip
    r_kl = kl_token_rewards(old, ref, mask, coef=0.01)
    assert r_kl.tolist()[0] == pytest.approx([-0.002, 0.001, 0.005], abs=1e-12)
    r = r_dpo + r_kl
    assert r.tolist()[0] == pytest.approx([0.018, -0.009, 0.055], abs=1e-12)  # the card's r without the RM's 1.3
    assert returns_to_go(r, mask).tolist()[0] == pytest.approx([0.064, 0.046, 0.055], abs=1e-12)  # GAE γ=λ=1, V=0
    with_rm = r + torch.tensor([[0.0, 0.0, 1.3]], dtype=torch.float64)  # the card's total r = [0.018, −0.009, 1.355]
    assert returns_to_go(with_rm, mask).tolist()[0] == pytest.approx([1.364, 1.346, 1.355], abs=1e-12)
    # GAE(γ = 1, λ = 0.95) with V ≡ 0 (rto-lite's default: the release's λ, no critic)
    assert returns_to_go(with_rm, mask, 0.95).tolist()[0] == pytest.approx([1.2323375, 1.27825, 1.355], abs=1e-12)
    # |r_dpo| ≤ c, 0 at padding
    big = dpo_token_rewards(10 * dpo, ref, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64), 1.0, 0.05)
    assert big.abs().max().item() <= 0.05 and big[0, 2].item() == 0.0


def rollouts_of(token_rows: list[list[int]], prompt: list[int]) -> Rollouts:
    n = len(token_rows)
    return Rollouts(prompt_ids=[prompt] * n, completion_ids=token_rows, prompts=[""] * n, completions=[""] * n,
                    group=torch.zeros(n, dtype=torch.long), source=["policy"] * n,
                    scores=torch.zeros(n, 1, dtype=torch.float64), weights=torch.ones(1, dtype=torch.float64),
                    eos=torch.zeros(n, dtype=torch.bool),
                    lengths=torch.tensor([len(c) for c in token_rows], dtype=torch.float64))  # fmt: skip


def test_design_notes_per_token_advantages():
    """Sequence advantage 0.5, token rewards [0.025, −0.05, 0] → [0.475, 0.45, 0.5] (design note, online.md §3.3:
    λ = 1, no token baseline), through RTO.advantages with the token rewards given; a shorter row is 0 past its
    end; the default batch-mean baseline subtracts the mean token return over the batch's tokens."""
    rewards = torch.tensor([[0.025, -0.05, 0.0], [0.04, 0.0, 0.0]], dtype=torch.float64)
    batch, baseline = rollouts_of([[5, 6, 7], [5]], [1, 2]), torch.tensor([0.5, -0.5], dtype=torch.float64)
    method = RTO(dpo_model="unused", kl_coef=0.0, gae_lambda=1.0, token_baseline="none")
    method.token_rewards = lambda rollouts: rewards
    out = method.advantages(batch, baseline)
    assert out.tolist()[0] == pytest.approx([0.475, 0.45, 0.5], abs=1e-12)
    assert out.tolist()[1] == pytest.approx([-0.46, 0.0, 0.0], abs=1e-12)
    centred = RTO(dpo_model="unused", kl_coef=0.0, gae_lambda=1.0)
    centred.token_rewards = lambda rollouts: rewards
    mean = (-0.025 - 0.05 + 0.0 + 0.04) / 4  # over the 4 completion tokens
    out = centred.advantages(batch, baseline)
    assert out.tolist()[0] == pytest.approx([0.475 - mean, 0.45 - mean, 0.5 - mean], abs=1e-12)
    assert out.tolist()[1] == pytest.approx([-0.46 - mean, 0.0, 0.0], abs=1e-12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """π_ref = the seeded tiny model (also the GRPO policy's start); π_dpo = it after 8 dpo steps on digit pairs (12 digits ≻ 12 other characters)."""
    root = tmp_path_factory.mktemp("rto")
    ref = save_tiny_model(root / "ref")
    rng = random.Random(0)
    rows = [{"prompt": p["prompt"], "chosen": "".join(rng.choice(string.digits) for _ in range(12)),
             "rejected": "".join(rng.choice(string.ascii_letters + " .,:;!?") for _ in range(12))}
            for p in PROMPTS]  # fmt: skip
    trainer = train_tiny("dpo", root / "dpo-run", rows=rows, max_steps=8, learning_rate=1e-2)
    trainer.save_model(str(root / "dpo"))
    build_tokenizer().save_pretrained(str(root / "dpo"))
    return ref, str(root / "dpo")


def grpo_trainer(tmp_path, method, scorers, max_steps=1, **kwargs):
    tok = build_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=max_steps, learning_rate=1e-2, per_device_train_batch_size=8,
                      num_generations=4, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                      disable_tqdm=True, seed=0, use_cpu=True, activation_checkpointing=False,
                      dataloader_pin_memory=False, **kwargs)  # fmt: skip
    return PlusGRPOTrainer(build_model(tok), method=method, args=args, train_dataset=Dataset.from_list(PROMPTS),
                           processing_class=tok, scorers=scorers,
                           rollout=Rollout(n=4, decoding={"max_new_tokens": 16, "temperature": 1.0}))  # fmt: skip


def digits(weight=1.0):
    scorer = get_registry().get_scorer("digits")
    return [(scorer(scorer.Config()), weight)]


def test_dpo_reward_is_zero_when_pi_dpo_is_pi_ref(models, tmp_path):
    ref, dpo = models
    same = RTO(dpo_model=ref, ref_model=ref, kl_coef=0.0)
    same.grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    assert same.dpo is not same.ref  # two separately loaded copies
    batch = rollouts_of([[10, 11, 12, 13], [20, 21]], [1, 30, 31])
    assert same.token_rewards(batch).abs().max().item() == 0.0
    baseline = torch.tensor([0.7, -0.7], dtype=torch.float64)
    assert same.advantages(batch, baseline).tolist() == [[0.7] * 4, [-0.7, -0.7, 0.0, 0.0]]
    trained = RTO(dpo_model=dpo, ref_model=ref, kl_coef=0.0)
    trained.grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    assert trained.token_rewards(batch).abs().max().item() > 0.0
    off = RTO(dpo_model=dpo, ref_model=ref, kl_coef=0.0, dpo_reward_scale=0.0)  # β1 = 0: GRPO's advantages
    off.dpo, off.ref = trained.dpo, trained.ref
    assert off.advantages(batch, baseline).tolist() == [[0.7] * 4, [-0.7, -0.7, 0.0, 0.0]]


def test_an_adapter_dpo_model_uses_its_base_as_pi_ref(models, tmp_path):
    """dpo_model a LoRA adapter folder, ref_model null: π_ref is the adapter's base (adapter off, no second copy)."""
    ref, _ = models
    adapter = save_tiny_adapter(ref, tmp_path / "adapter")
    method = RTO(dpo_model=adapter, kl_coef=0.0, dpo_reward_clip=0.0)
    method.grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    assert method.ref is None
    batch = rollouts_of([[10, 11, 12, 13], [20, 21]], [1, 30, 31])
    with_adapter = rollout_token_logps(method.dpo, batch)
    with method.dpo.disable_adapter():
        base = rollout_token_logps(method.dpo, batch)
    separate = RTO(dpo_model=ref, ref_model=ref)  # the base loaded as a model of its own
    separate.grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    assert torch.allclose(base, rollout_token_logps(separate.ref, batch), atol=1e-6)
    mask = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    expected = 0.05 * (with_adapter - base) * mask
    assert expected.abs().max().item() > 1e-4 and torch.allclose(method.token_rewards(batch), expected, atol=1e-12)


def test_per_token_advantages_reach_trls_loss(models, tmp_path):
    """The [N, T] path: the trainer's advantages are TRL's sequence advantage + the return-to-go of r computed
    here from π_dpo, π_ref and the sampling policy's log-probs."""
    ref, dpo = models
    method = RTO(dpo_model=dpo, ref_model=ref)
    t = grpo_trainer(tmp_path, method, digits())
    seen = {}
    original = method.advantages

    def spy(rollouts, baseline):
        seen["rollouts"], seen["baseline"] = rollouts, baseline
        return original(rollouts, baseline)

    method.advantages = spy
    out = t._generate_and_score_completions(PROMPTS[:2] * 4)
    rollouts, baseline = seen["rollouts"], seen["baseline"]
    mask = out["completion_mask"].double()
    assert out["advantages"].shape == out["completion_ids"].shape  # [N, T]
    d, r = rollout_token_logps(method.dpo, rollouts), rollout_token_logps(method.ref, rollouts)
    old = rollouts.old_token_logps  # the sampling policy: at its first step it is π_ref, so r_kl = 0
    assert torch.allclose(old, r, atol=1e-5)
    rewards = (0.05 * (d - r)).clamp(-0.05, 0.05) * mask - 0.01 * (old - r) * mask
    gae = torch.zeros_like(rewards)  # λ = 0.95, V ≡ 0
    for t in reversed(range(rewards.size(1))):
        gae[:, t] = rewards[:, t] + (0.95 * gae[:, t + 1] if t + 1 < rewards.size(1) else 0.0)
    gae = (gae - (gae * mask).sum() / mask.sum()) * mask  # the batch-mean token baseline
    expected = (baseline[:, None] + gae) * mask
    assert torch.allclose(out["advantages"].double(), expected, atol=1e-6)
    assert (out["advantages"].double() - baseline[:, None] * mask).abs().max().item() > 1e-3  # tokens differ


def test_config_errors(tmp_path, models):
    assert RTO(dpo_model="m").config.model_dump() == {"dpo_model": "m", "ref_model": None, "dpo_reward_scale": 0.05,
                                                      "dpo_reward_clip": 0.05, "kl_coef": 0.01, "gae_lambda": 0.95,
                                                      "token_baseline": "batch-mean", "batch_size": 8}  # fmt: skip
    bad_configs = ({"dpo_reward_clip": -0.1}, {"kl_coef": -1.0}, {"dpo_reward_scale": -0.05},
                   {"dpo_reward_scal": 0.1}, {"gae_lambda": 1.5}, {"token_baseline": "critic"})  # fmt: skip
    for bad in bad_configs:
        with pytest.raises(ValidationError):
            RTO(dpo_model="m", **bad)
    with pytest.raises(TrlPlusError, match="^method_args.dpo_model: RTO needs π_dpo"):
        RTO().grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(TrlPlusError, match="^method_args.ref_model: dpo_model is a full model"):
        RTO(dpo_model=models[1]).grpo_config(GRPOConfig(output_dir=str(tmp_path), use_cpu=True))


def test_learns_from_the_dpo_token_reward_alone(models, tmp_path):
    """β3 = 0 (the digits scorer's weight 0: every sequence advantage is 0): only RTO's token rewards move the
    policy, at the release's β1 = c = 0.05, β2 = 0.01, λ = 0.95; π_dpo prefers digits over other characters, and
    the digits count of the samples (TRL's rewards/digits/mean, unweighted: the generation side) rises."""
    ref, dpo = models
    t = grpo_trainer(tmp_path, RTO(dpo_model=dpo, ref_model=ref), digits(weight=0.0), max_steps=20)
    t.train()
    curve = [e["rewards/digits/mean"] for e in t.state.log_history if "rewards/digits/mean" in e]
    assert len(curve) == 20 and all(e["rollout/reward"] == 0 for e in t.state.log_history if "rollout/reward" in e)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print(f"digits {first:.3f} -> {last:.3f}: {[round(c, 2) for c in curve]}")
    assert last - first > 1.85, (first, last)  # measured 1.90 -> 5.63 (+3.7)


def test_the_recipe_validates(monkeypatch):
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/rto.yaml").read_text())
    assert recipe["method"] == "rto"
    RTOConfig(**recipe["method_args"])
    check_recipe(load_recipe("recipes/rto.yaml"))  # (the plugin is installed: registered by its entry point)
