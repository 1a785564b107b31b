"""The rollout stage of online methods: rows from samples (the tie rule), rule scorers, TRL reward functions, the
stage inside PlusTrainer (sampled ids carried as they were sampled, the reference sampled with the adapter off,
learning asserted on the generation-side reward), and the recipe's ``rollout:`` block."""

from __future__ import annotations

import pytest
import torch

from trl_plus import DPO, OnlineMethod, Paper, Rollout, Rollouts, TrlPlusError, get_registry
from trl_plus.testing import registered, tiny_trainer, training_logs, write_jsonl

PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(16)]
FAST = Rollout(n=2, decoding={"max_new_tokens": 12, "temperature": 1.0})


class OnlineDPOTest(OnlineMethod, DPO):
    name = "online-dpo-test"
    paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")


def scorer(name: str, **args):
    cls = get_registry().get_scorer(name)
    return cls(cls.Config(**args))


def rollouts(rewards: list[list[float]]) -> Rollouts:
    """Hand-made rollouts: one group per inner list, completion ids = [row index]."""
    group = [g for g, values in enumerate(rewards) for _ in values]
    n = len(group)
    flat = [r for values in rewards for r in values]
    return Rollouts(prompt_ids=[[100 + g] for g in group], completion_ids=[[i] for i in range(n)],
                    prompts=[""] * n, completions=[""] * n, group=torch.tensor(group), source=["policy"] * n,
                    scores=torch.tensor(flat, dtype=torch.float64).unsqueeze(-1), weights=torch.ones(1),
                    eos=torch.ones(n, dtype=torch.bool), lengths=torch.ones(n))  # fmt: skip


def test_make_examples_best_vs_worst_and_ties_go_to_the_first_sample():
    # the online-dpo card's scores: [first1, first2, second1, second2] = [0.7, -0.2, 0.1, -0.2], grouped by prompt
    rows = OnlineDPOTest().make_examples(rollouts([[0.7, 0.1], [-0.2, -0.2], [0.0, 3.0, 1.0]]))
    assert [(r["chosen_ids"], r["rejected_ids"]) for r in rows] == [([0], [1]), ([2], [3]), ([5], [4])]
    assert rows[2]["prompt_ids"] == [102]
    assert OnlineDPOTest().make_examples(rollouts([[1.0]])) == []  # one sample: no pair


def test_reward_is_the_weighted_nansum_of_the_scores():
    r = rollouts([[1.0, 2.0]])
    r.scores = torch.tensor([[1.0, float("nan")], [2.0, 4.0]], dtype=torch.float64)
    r.weights = torch.tensor([1.0, -0.5], dtype=torch.float64)
    assert r.reward().tolist() == [1.0, 0.0]


def test_rule_scorers_and_their_trl_reward_functions():
    completions = ["12 apples", "no", "Apple 7 apple", "x 3"]
    assert scorer("digits").score([""] * 4, completions)[:, 0].tolist() == [2, 0, 1, 1]
    assert scorer("keyword", keyword="apple", count=True).score([""] * 4, completions)[:, 0].tolist() == [1, 0, 2, 0]
    assert scorer("regex", pattern=r"\d+").score([""] * 4, completions)[:, 0].tolist() == [1, 0, 1, 1]
    exact = scorer("exact-answer", match="last-number")
    assert exact.score([""] * 4, completions, answer=["12", "1", "7", "4"])[:, 0].tolist() == [1, 0, 1, 0]
    (digits,) = scorer("digits").reward_funcs()
    assert digits.__name__ == "digits" and digits(prompts=["a", "b"], completions=["1", "22"]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="needs the data column 'answer'"):
        exact.score([""], ["1"])


def test_a_reward_model_with_several_labels_is_a_vector_scorer():
    from pydantic import ValidationError

    assert scorer("reward-model", model="rm").outputs == ("reward",)
    assert scorer("reward-model", model="rm", label=[0, 4]).outputs == ("label_0", "label_4")
    assert scorer("reward-model", model="rm", label=[0, 4], names=["help", "verbose"]).outputs == ("help", "verbose")
    with pytest.raises(ValidationError, match=r"2 label\(s\) but 1 name\(s\)"):
        scorer("reward-model", model="rm", label=[0, 4], names=["help"])


def test_the_stage_carries_the_sampled_ids_and_cuts_after_eos(tmp_path, monkeypatch):
    tie = scorer("keyword", keyword="\u00a7")  # in no completion: every score 0, a tie
    trainer = tiny_trainer(OnlineDPOTest, tmp_path, rows=PROMPTS, max_steps=1, scorers=[(tie, 1.0)],
                           rollout=FAST)  # fmt: skip
    eos = trainer._tokenizer.eos_token_id
    samples = iter([[5, 6, eos], [7, 8, 9, 10]] * 8)
    monkeypatch.setattr(trainer, "generate", lambda ids, source="policy": [next(samples) for _ in ids])
    rows = [{"prompt_ids": trainer.train_dataset[i]["prompt_ids"], "prompt": PROMPTS[i]["prompt"], "columns": {}}
            for i in range(2)]  # fmt: skip
    r = trainer.rollout_stage(rows)
    assert r.completion_ids == [[5, 6, eos], [7, 8, 9, 10]] * 2
    assert r.eos.tolist() == [True, False, True, False] and r.group.tolist() == [0, 0, 1, 1]
    made = trainer.method.make_examples(r)  # a tie: the first sample is chosen
    assert made[0]["chosen_ids"] == [5, 6, eos] and made[0]["rejected_ids"] == [7, 8, 9, 10]


def test_generate_cuts_at_the_first_eos_and_leaves_the_training_rng_alone(tmp_path):
    trainer = tiny_trainer(OnlineDPOTest, tmp_path, rows=PROMPTS, max_steps=1, scorers=[(scorer("digits"), 1.0)],
                           rollout=FAST)  # fmt: skip
    eos = trainer._tokenizer.eos_token_id
    prompt = trainer.train_dataset[0]["prompt_ids"]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    out = trainer.generate([prompt] * 6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(len(ids) <= 12 and (eos not in ids[:-1]) for ids in out)
    assert trainer.generate([prompt] * 6) == out  # same step, same seed: the same samples


def test_an_online_run_raises_the_generation_side_reward(tmp_path):
    """The learning test asserts on what the policy writes (rollout/reward), never on the loss."""
    trainer = tiny_trainer(OnlineDPOTest, tmp_path, rows=PROMPTS, max_steps=30, learning_rate=1e-2,
                           scorers=[(scorer("digits"), 1.0)],
                           rollout=Rollout(n=2, decoding={"max_new_tokens": 16, "temperature": 1.0}))  # fmt: skip
    trainer.train()
    logs = training_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy = reference
    first = sum(e["rollout/reward"] for e in logs[:5]) / 5
    last = sum(e["rollout/reward"] for e in logs[-5:]) / 5
    assert last - first > 6.0, (first, last)  # the design note measured 1.5 -> 14.1; half of that rise at least


def test_the_reference_is_sampled_with_the_adapter_off(tmp_path, monkeypatch):
    from peft import LoraConfig

    trainer = tiny_trainer(OnlineDPOTest, tmp_path, rows=PROMPTS, max_steps=1, scorers=[(scorer("digits"), 1.0)],
                           rollout=Rollout(n=1, sources=("policy", "reference"), decoding={"max_new_tokens": 6}),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))  # fmt: skip
    policy = trainer.accelerator.unwrap_model(trainer.model)
    seen = []
    real = type(policy.get_base_model()).generate

    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next(m for m in policy.modules() if isinstance(m, BaseTunerLayer))

    def spy(model, *args, **kwargs):
        seen.append(layer.disable_adapters)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(type(policy.get_base_model()), "generate", spy)
    rows = [{"prompt_ids": trainer.train_dataset[i]["prompt_ids"], "prompt": "", "columns": {}} for i in range(2)]
    r = trainer.rollout_stage(rows)
    assert r.source == ["policy", "reference"] * 2 and seen == [False, True]
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_B" in n)  # the peft trap avoided


def test_a_scorer_of_the_wrong_shape_is_one_line(tmp_path):
    class Broken(type(scorer("digits"))):
        name = "broken"

        def score(self, prompts, completions, **columns):
            return torch.zeros(len(completions), 3)

    trainer = tiny_trainer(OnlineDPOTest, tmp_path, rows=PROMPTS, max_steps=1, scorers=[(Broken(), 1.0)],
                           rollout=Rollout(n=2, decoding={"max_new_tokens": 4}))  # fmt: skip
    rows = [{"prompt_ids": trainer.train_dataset[0]["prompt_ids"], "prompt": "", "columns": {}}]
    with pytest.raises(TrlPlusError, match=r"rollout.scorers: broken returned shape \(2, 3\) for 2 completions; "
                                           r"expected \(2, 1\)"):  # fmt: skip
        trainer.rollout_stage(rows)


def recipe(tmp_path, rollout: str, method: str = "online-dpo-test") -> str:
    write_jsonl(PROMPTS, tmp_path / "prompts.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(f"""
method: {method}
model: {{name_or_path: tiny-llama, dtype: float32}}
data: {{train: {{path: prompts.jsonl}}}}
{rollout}
training: {{output_dir: {tmp_path / 'run'}, max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-2,
  activation_checkpointing: false, disable_tqdm: true, report_to: none, save_strategy: "no"}}
""")
    return str(path)


def test_a_recipe_trains_an_online_method_and_bad_rollout_blocks_are_one_line(tmp_path, monkeypatch):
    from trl_plus.config import load_recipe
    from trl_plus.run.train import train
    from trl_plus.run.validate import check_recipe
    from trl_plus.testing import forbid_model_loading

    with registered(OnlineDPOTest):
        result = train(recipe(tmp_path, "rollout: {n: 2, decoding: {max_new_tokens: 8}, scorers: [{name: digits}]}"))
        assert result.global_step == 2 and "rollout/reward" in result.metrics
        forbid_model_loading(monkeypatch)
        cases = {
            "rollout: {scorers: [{name: digit}]}": r"rollout.scorers.0.name: unknown scorer 'digit' \(did you mean "
                                                   r"digits\?\)",
            "rollout: {n: 2}": r"rollout: method 'online-dpo-test' ranks its own samples: add rollout: \{scorers:",
            "rollout: {sources: [policy, model], scorers: [{name: digits}]}": r"'model' is not policy, reference",
            "rollout: {scorers: [{name: keyword, args: {}}]}": r"rollout.scorers.0.args.keyword: required key",
            "rollout: {decoding: {temprature: 0.5}, scorers: [{name: digits}]}": r"rollout.decoding.temprature: not "
                                                                                 r"a generation setting \(did you "
                                                                                 r"mean temperature\?\)",
            "rollout: {decoding: {temperature: -1}, scorers: [{name: digits}]}": r"rollout.decoding.temperature: "
                                                                                 r"expected a number > 0, got -1",
            "rollout: {decoding: {top_p: 2}, scorers: [{name: digits}]}": r"rollout.decoding.top_p: expected a "
                                                                          r"number in \(0, 1\], got 2",
            "rollout: {decoding: {eos_token_id: 3}, scorers: [{name: digits}]}": r"rollout.decoding.eos_token_id: "
                                                                                 r"set by trl-plus itself",
            "rollout: {missing_eos_penalty: -1, scorers: [{name: digits}]}": r"rollout.missing_eos_penalty: .*greater "
                                                                             r"than or equal to 0",
        }
        for block, message in cases.items():
            with pytest.raises(TrlPlusError, match=message):
                check_recipe(load_recipe(recipe(tmp_path, block)))
    with pytest.raises(TrlPlusError, match=r"rollout: method 'dpo' trains on its data, it samples nothing"):
        check_recipe(load_recipe(recipe(tmp_path, "rollout: {scorers: [{name: digits}]}", method="dpo")))
    # a prompt-only file for an offline method; a pair file for an online one
    from trl_plus.run.validate import load_split

    prompts_only = load_recipe(recipe(tmp_path, "", method="dpo"))
    with pytest.raises(TrlPlusError, match=r"prompts.jsonl\): missing columns 'chosen', 'rejected'"):
        load_split(prompts_only, get_registry().get("dpo")(), "train")
    pairs = load_recipe(recipe(tmp_path, "rollout: {scorers: [{name: digits}]}"))
    pairs.data.train.path = write_jsonl([{"prompt": "a", "chosen": "b", "rejected": "c"}], tmp_path / "pairs.jsonl")
    with registered(OnlineDPOTest), pytest.raises(TrlPlusError, match=r"has chosen/rejected pairs, but method "
                                                                      r"'online-dpo-test' samples its own"):
        load_split(pairs, OnlineDPOTest(), "train")


def test_the_example_recipe_of_an_online_method_runs(tmp_path, monkeypatch):
    """``trl-plus show``'s example recipe names a scorer (``rollout:``) and trains as printed."""
    from pathlib import Path

    import yaml

    from trl_plus.cli import example_recipe
    from trl_plus.run.train import train

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    text = example_recipe(OnlineDPOTest)
    assert yaml.safe_load(text)["rollout"] == {"decoding": {"max_new_tokens": 16}, "scorers": [{"name": "digits"}]}
    (tmp_path / "example.yaml").write_text(text)
    with registered(OnlineDPOTest):
        result = train(str(tmp_path / "example.yaml"), ["training.max_steps=1", f"training.output_dir={tmp_path / 'run'}"])
    assert result.global_step == 1 and "rollout/reward" in result.metrics


def test_a_step_whose_filters_leave_one_process_no_row_runs_on_both_processes(tmp_path):
    """Two CPU processes under ``accelerate launch``; at step 2 process 0's make_examples returns nothing. Both
    processes still run the step (no hang in the gradient all-reduce), on stand-in rows whose loss is multiplied
    by 0, and end with the same parameters."""
    import json

    from trl_plus.testing import launch

    proc = launch("tests/scripts/online_empty_step.py", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["processes"] == 2
    assert [e["rollout/empty"] for e in result["logs"]] == [0.0, 0.5, 0.0]  # the mean over the two processes
    assert result["checksums"][0] == result["checksums"][1]  # DDP kept the processes in step
