"""Online DPO: the card's worked example (pairing, loss, gradients, IPO), the tie rule, the EOS penalty, equality
with TRL's own OnlineDPOTrainer on fixed completions and rewards, the generation-side reward rising (full
fine-tuning and LoRA), and the recipe running on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_online_dpo import OnlineDPO, OnlineDPOConfig

from trl_plus import Rollout, Rollouts, Scorer, get_registry
from trl_plus.testing import build_model, build_tokenizer, make_context, perturb, tiny_trainer

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(16)]


def rollouts(rewards: list[list[float]], eos: list[bool] | None = None) -> Rollouts:
    """Hand-made rollouts, group-major: one group per inner list, completion ids = [row index]."""
    group = [g for g, values in enumerate(rewards) for _ in values]
    n = len(group)
    return Rollouts(prompt_ids=[[100 + g] for g in group], completion_ids=[[i] for i in range(n)],
                    prompts=[""] * n, completions=[""] * n, group=torch.tensor(group), source=["policy"] * n,
                    scores=torch.tensor([r for values in rewards for r in values], dtype=torch.float64)[:, None],
                    weights=torch.ones(1, dtype=torch.float64), eos=torch.tensor(eos or [True] * n),
                    lengths=torch.ones(n))  # fmt: skip


def pairs(rows):
    return [(r["chosen_ids"][0], r["rejected_ids"][0]) for r in rows]


# The card (β = 0.1, B = 2): sequence sums, policy / reference, of each prompt's chosen and rejected sample.
CHOSEN, REJECTED = ([-12.0], [-20.0]), ([-15.0], [-18.0])
REF_CHOSEN, REF_REJECTED = ([-13.0], [-19.0]), ([-14.0], [-18.5])


def card_context():
    return make_context([list(CHOSEN), list(REJECTED)], [list(REF_CHOSEN), list(REF_REJECTED)])


def test_card_worked_example_pairing_loss_and_gradients():
    # scores [first1, first2, second1, second2] = [0.7, -0.2, 0.1, -0.2]: grouped by prompt [[0.7, 0.1], [-0.2, -0.2]]
    assert pairs(OnlineDPO().make_examples(rollouts([[0.7, 0.1], [-0.2, -0.2]]))) == [(0, 1), (2, 3)]  # both: first
    ctx = card_context()
    out = OnlineDPO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.684548, abs=1e-6)
    for b, expected in enumerate([0.598139, 0.770957]):  # Δ = [2, −1.5]
        pair = make_context([[CHOSEN[b]], [REJECTED[b]]], [[REF_CHOSEN[b]], [REF_REJECTED[b]]])
        assert OnlineDPO().loss(pair).loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    grad = ctx.token_logps.grad[..., 0]
    assert grad[0].tolist() == pytest.approx([-0.0225083, -0.0268715], abs=1e-7)
    assert grad[1].tolist() == pytest.approx([0.0225083, 0.0268715], abs=1e-7)
    assert torch.allclose(out.rewards, 0.1 * (ctx.logps() - ctx.ref_logps()).detach())
    assert out.metrics["objective/kl"].item() == pytest.approx((1 - 1 - 1 + 0.5) / 4)  # mean of ℓθ − ℓref
    assert OnlineDPO(loss_type="ipo").loss(card_context()).loss.item() == pytest.approx(25.625, abs=1e-9)  # sum form


def test_policy_equal_to_reference_gives_log_2_and_the_cards_gradients():
    same = [[[-3.0, -1.0], [-7.0]], [[-2.0], [-4.0, -4.0, -1.0]]]
    ctx = make_context(same, same)
    out = OnlineDPO(beta=0.3).loss(ctx)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    out.loss.backward()
    grad = ctx.token_logps.grad  # ∂L/∂ℓθ(y_c) = −β/(2B), ∂L/∂ℓθ(y_r) = +β/(2B), on every scored token
    assert grad[0][ctx.mask[0] > 0].tolist() == pytest.approx([-0.3 / 4] * 3)
    assert grad[1][ctx.mask[1] > 0].tolist() == pytest.approx([0.3 / 4] * 4)


def test_ties_go_to_the_first_sample_and_the_loss_ignores_which_half_a_sample_came_from():
    assert pairs(OnlineDPO().make_examples(rollouts([[1.0, 1.0], [0.0, 2.0]]))) == [(0, 1), (3, 2)]
    swapped = pairs(OnlineDPO().make_examples(rollouts([[0.1, 0.7]])))
    assert swapped == [(1, 0)]  # the same two samples, generated the other way round: the same pair
    assert OnlineDPO().make_examples(rollouts([[1.0]])) == []  # one sample: no pair


def test_the_missing_eos_penalty_lowers_only_samples_without_eos():
    scores = [[1.0, 0.8], [1.0, 0.8], [0.0, 0.5]]
    eos = [False, True, True, True, False, False]
    assert pairs(OnlineDPO().make_examples(rollouts(scores, eos))) == [(0, 1), (2, 3), (5, 4)]
    penalized = OnlineDPO().make_examples(rollouts(scores, eos).penalize_missing_eos(0.5))  # as the stage does
    # prompt 1: 1.0 − 0.5 < 0.8, the order flips; prompt 2: both have EOS; prompt 3: both lack it, order kept
    assert pairs(penalized) == [(1, 0), (2, 3), (5, 4)]
    r = rollouts(scores, eos).penalize_missing_eos(0.5)
    assert r.reward().tolist() == [0.5, 0.8, 1.0, 0.8, -0.5, 0.0] and r.score_names[-1] == "missing_eos"
    assert rollouts(scores, eos).penalize_missing_eos(None).reward().tolist() == [1.0, 0.8, 1.0, 0.8, 0.0, 0.5]


def test_config_validation():
    assert OnlineDPO().config.beta == 0.1 and OnlineDPO().config.loss_type == "sigmoid"
    assert OnlineDPO().needs.rollout.missing_eos_penalty is None  # (the recipe's rollout.missing_eos_penalty)
    with pytest.raises(ValidationError):
        OnlineDPO(loss_type="hinge")
    with pytest.raises(ValidationError):
        OnlineDPO(betta=0.2)  # a typo is an error
    cls = get_registry().get("online-dpo")
    assert cls.needs.rollout.n == 2 and cls.needs.rollout.sources == ("policy",)
    assert cls.required_columns() == ("prompt",)


# -- equality with TRL's OnlineDPOTrainer --------------------------------------------------------------------

BATCH, WIDTH = 4, 9


class FixedScores(Scorer):
    """A reward per completion text: the same table as the TRL reward function of the test."""

    name = "fixed-scores"
    table: dict[str, float] = {}

    def score(self, prompts, completions, **columns):
        return torch.tensor([[self.table[c]] for c in completions], dtype=torch.float64)


@pytest.fixture(scope="module")
def both_trainers(tmp_path_factory):
    """TRL's OnlineDPOTrainer (``_generate`` returning fixed completions) and ours (``generate`` returning the same
    ids), both policies perturbed by the same noise away from their reference (the initial model), one reward table."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        tmp = tmp_path_factory.mktemp("parity")
        tokenizer = build_tokenizer()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        g = torch.Generator().manual_seed(0)
        completions = {}  # (sample s, prompt b): random ids; some end early with EOS, the others run the full width
        for s in range(2):
            for b in range(BATCH):
                ids = torch.randint(4, len(tokenizer), (WIDTH,), generator=g).tolist()
                cut = [3, None, 6, None, 5, 8, None, 2][s * BATCH + b]
                completions[s, b] = ids[: cut - 1] + [eos] if cut else ids
        rewards = [0.7, -0.2, 1.5, 0.3, 0.1, -0.2, 2.0, 0.9]  # prompt 2: a tie; prompt 3: the EOS penalty flips it
        texts = {k: tokenizer.decode(v, skip_special_tokens=True) for k, v in completions.items()}
        FixedScores.table = {texts[s, b]: rewards[s * BATCH + b] for s in range(2) for b in range(BATCH)}
        assert len(FixedScores.table) == 2 * BATCH

        plus = tiny_trainer(OnlineDPO, tmp / "plus", rows=PROMPTS[:BATCH], scorers=[(FixedScores(), 1.0)],
                            training={"per_device_train_batch_size": BATCH})  # fmt: skip
        plus.generate = lambda ids, source="policy": [completions[s, b] for b in range(BATCH) for s in range(2)]
        prompt_ids = [plus.train_dataset[b]["prompt_ids"] for b in range(BATCH)]

        def trl_generate(model, prompts, images=None):  # [first samples of prompts 1..B; second samples], padded
            longest = max(map(len, prompt_ids))
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompt_ids] * 2)
            mask = (ids != pad).long()
            rows = [completions[s, b] for s in range(2) for b in range(BATCH)]
            out = torch.tensor([r + [pad] * (WIDTH - len(r)) for r in rows])
            out_mask = torch.tensor([[1] * len(r) + [0] * (WIDTH - len(r)) for r in rows])
            return ids, mask, out, out_mask, None

        def trl_reward(prompts, completions, **kwargs):
            return [FixedScores.table[c] for c in completions]

        args = OnlineDPOConfig(output_dir=str(tmp / "trl"), beta=0.1, report_to="none", bf16=False,
                               gradient_checkpointing=False, per_device_train_batch_size=BATCH,
                               dataloader_pin_memory=False)  # fmt: skip
        trl = OnlineDPOTrainer(build_model(tokenizer), reward_funcs=trl_reward, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(PROMPTS[:BATCH]))  # fmt: skip
        trl._generate = trl_generate
        for trainer in (trl, plus):
            perturb(trainer.model)
        yield trl, plus


@pytest.mark.parametrize("loss_type, penalty", [("sigmoid", None), ("ipo", None), ("sigmoid", 0.5)])
def test_equals_trl_online_dpo_trainer_on_fixed_completions(both_trainers, loss_type, penalty):
    """The same completions, rewards and policy through TRL's ``training_step`` and ours: the same loss."""
    trl, plus = both_trainers
    trl.args.loss_type, trl.args.missing_eos_penalty = loss_type, penalty
    plus.method.config = OnlineDPOConfig(loss_type=loss_type)
    plus.rollout = plus.rollout.updated({"missing_eos_penalty": penalty})  # the stage applies it
    expected = trl.training_step(trl.model, {"prompt": [r["prompt"] for r in PROMPTS[:BATCH]]}).item()
    inputs = plus._prepare_inputs(plus.data_collator([plus.train_dataset[b] for b in range(BATCH)]))
    with torch.no_grad():
        got = plus.compute_loss(plus.model, inputs).item()
    # float32 on both sides: the sequence sums (|ℓ| up to ~43 here) agree to one ulp (3.8e-6), which moves the
    # sigmoid loss by β·σ·3.8e-6 ≈ 2e-7 (measured 2.4e-7) and the IPO loss ((Δ − 5)², ~31) by 2·|Δ − 5|·3.8e-6,
    # relative 1.1e-6 (measured): under 1e-6 is below float32's resolution of the sums, hence 2e-6 for IPO
    if loss_type == "sigmoid":
        assert got == pytest.approx(expected, abs=1e-6)
    else:
        assert got == pytest.approx(expected, rel=2e-6)
    assert abs(got - math.log(2)) > 1e-3  # the policy really differs from the reference


# -- learning on the tiny model ------------------------------------------------------------------------------

def reward_rise(log_history) -> tuple[float, float]:
    curve = [e["rollout/reward"] for e in log_history if "loss" in e]
    return sum(curve[:5]) / 5, sum(curve[-5:]) / 5


def test_the_generation_side_reward_rises(tmp_path):
    """Full fine-tuning (the reference: a frozen copy), the digits scorer, 20 steps, as the design note measured."""
    trainer = tiny_trainer(OnlineDPO, tmp_path, rows=PROMPTS, max_steps=20, learning_rate=1e-2,
                           scorers=[(get_registry().get_scorer("digits")(), 1.0)],
                           rollout=Rollout(n=2, decoding={"max_new_tokens": 16, "temperature": 1.0}))  # fmt: skip
    trainer.train()
    logs = trainer.state.log_history
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    first, last = reward_rise(logs)
    assert last - first > 6.3, (first, last)  # the design note: 1.5 -> 14.1; at least half of that rise


def test_a_lora_run_raises_the_reward_too(tmp_path):
    from peft import LoraConfig

    digits = get_registry().get_scorer("digits")
    model = build_model(build_tokenizer(), initializer_range=0.3)  # with 0.02 LoRA cannot move the output (design note)
    trainer = tiny_trainer(OnlineDPO, tmp_path, rows=PROMPTS, max_steps=15, learning_rate=5e-2, model=model,
                           scorers=[(digits(), 1.0)],
                           peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                           rollout=Rollout(n=2, decoding={"max_new_tokens": 16, "temperature": 1.0}))  # fmt: skip
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None  # the reference: the adapter off
    trainer.train()
    first, last = reward_rise(trainer.state.log_history)
    assert last - first > 3.0, (first, last)


def test_the_recipe_validates(monkeypatch):
    """recipes/online-dpo.yaml: the tiny model, the digits scorer, TRL's defaults (tests/test_rollout.py trains an
    online method's recipe end to end; `trl-plus train recipes/online-dpo.yaml` runs it as written)."""
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/online-dpo.yaml").read_text())
    assert recipe["method"] == "online-dpo" and recipe["rollout"]["scorers"] == [{"name": "digits"}]
    assert recipe["method_args"] == OnlineDPOConfig().model_dump()
    check_recipe(load_recipe("recipes/online-dpo.yaml"))
