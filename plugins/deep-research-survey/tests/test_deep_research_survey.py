"""The deep-research survey's recipe: the card's token-F1 example and the multiplicative format gate, actions and
search over the offline corpus, scripted episodes through the environment, the trainer and the `research` scorer
(the rewards a policy that searches then answers earns), a corpus file of one's own, and the recipe running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trl_plus_deep_research_survey import (
    CORPUS,
    DeepResearchSurvey,
    OfflineSearch,
    Research,
    normalize_answer,
    parse_action,
    search,
    token_f1,
)

from trl_plus import Rollout, TrlPlusError
from trl_plus.testing import tiny_group_trainer

ROOT = Path(__file__).resolve().parents[3]


def test_card_token_f1_and_the_format_gate():
    assert token_f1("Paris France", "Paris") == pytest.approx(0.666667, abs=1e-6)  # precision 0.5, recall 1
    assert token_f1("The Paris.", "paris") == 1.0 and token_f1("Lyon", "Paris") == 0.0
    assert normalize_answer("The  Red, Planet!") == "red planet"
    ill_formed = {"answer": "Paris France", "searches": [], "invalid": 1, "turns": 2, "format_ok": False}
    well_formed = {**ill_formed, "invalid": 0, "format_ok": True}
    scores = Research().score([], [], episode=[ill_formed, well_formed], answer=["Paris", "Paris"])
    assert scores[:, 0].tolist() == pytest.approx([0.0, 0.666667], abs=1e-6)  # gated: 0 regardless of the F1
    assert scores[:, 1].tolist() == [0.0, 1.0]
    ungated = Research({"gate": False}).score([], [], episode=[ill_formed], answer=["Paris"])
    assert ungated[0, 0].item() == pytest.approx(0.666667, abs=1e-6)


def test_actions_and_search():
    assert parse_action("  Search: capital of France \nmore") == ("search", "capital of France")
    assert parse_action("\nanswer:Paris") == ("answer", "Paris")
    assert parse_action("I think Paris") is None and parse_action("") is None
    assert search(CORPUS, "capital France") == "Paris: Paris is the capital and largest city of France."
    assert search(CORPUS, "zzz qqq") is None


def test_a_scripted_episode_through_the_environment():
    env = OfflineSearch()
    state = env.reset("Question: What is the capital of Japan?")
    assert env.step(state, "hello") == "\ninvalid action: write `search: <words>` or `answer: <text>`\n"
    assert "Tokyo is the capital of Japan." in env.step(state, "search: capital Japan")
    assert env.step(state, "answer: Tokyo") is None
    record = env.outcome(state)
    assert record == {"answer": "Tokyo", "searches": ["capital Japan"], "invalid": 1, "turns": 3, "format_ok": False}


def test_a_corpus_of_ones_own_and_bad_ones(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text(json.dumps({"title": "Zorb", "text": "Zorb is a made-up town."}) + "\n")
    env = OfflineSearch({"corpus": str(good)})
    assert "made-up town" in env.step(env.reset("q"), "search: zorb town")
    with pytest.raises(TrlPlusError, match=r"corpus: .*missing.jsonl is not a file"):
        OfflineSearch({"corpus": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "x"}) + "\n")
    with pytest.raises(TrlPlusError, match=r"bad.jsonl line 1 lacks a title or a text field"):
        OfflineSearch({"corpus": str(bad)})


def test_a_policy_that_searches_then_answers_earns_the_rewards(tmp_path, one_thread):
    """The policy's turns scripted (turn 1 searches, turn 2 answers): through the trainer's episode player, the
    observation tokens are the document, and the `research` scorer's three rewards combine with the recipe's
    weights: 1 (F1) + 0.2 (format) − 0.05 (one search) = 1.15 for every episode."""
    rows = [{"prompt": "Question: What is the capital of France?\n", "answer": "Paris"}] * 8
    t = tiny_group_trainer(DeepResearchSurvey, tmp_path, rows=rows, max_steps=1, scorers=[(Research(), [1.0, 0.2, -0.05])],
                           rollout=Rollout(n=4, decoding={"max_new_tokens": 30},
                                           environment=OfflineSearch({"max_turns": 3})))  # fmt: skip
    tokenizer = t.processing_class
    script = ["search: capital France", "answer: Paris"]

    def scripted(histories, images, fields, n):  # what _generate_single_turn returns: the turns' token ids
        turn = scripted.calls
        scripted.calls += 1
        ids = tokenizer(script[turn], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return [list(ids) for _ in histories], None

    scripted.calls = 0
    t._generate_single_turn = scripted
    seen = []
    generate = t._generate_and_score_completions
    t._generate_and_score_completions = lambda inputs: seen.append((inputs, generate(inputs))) or seen[-1][1]
    t.train()
    inputs, output = seen[0]
    assert scripted.calls == 2  # every episode ended with its answer at turn 2
    for i, row in enumerate(inputs):
        assert row["episode"] == {"answer": "Paris", "searches": ["capital France"], "invalid": 0, "turns": 2,
                                  "format_ok": True}  # fmt: skip
        width = int(output["completion_mask"][i].sum())
        ids = output["completion_ids"][i][:width].tolist()
        turns = output["turn_ids"][i][:width].tolist()
        observed = tokenizer.decode([x for x, k in zip(ids, turns) if k == -1])
        assert observed == "\nParis: Paris is the capital and largest city of France.\n"
    logs = t.state.log_history[0]
    assert logs["rewards/research/answer_f1/mean"] == 1.0 and logs["rewards/research/format/mean"] == 1.0
    assert logs["rollout/reward"] == pytest.approx(1.15, abs=1e-6)


def test_the_recipe_validates_and_runs(tmp_path, monkeypatch, one_thread):
    from trl_plus import check_recipe, load_recipe, train

    monkeypatch.chdir(ROOT)
    check_recipe(load_recipe("recipes/deep-research-survey.yaml"))
    result = train("recipes/deep-research-survey.yaml", ["training.max_steps=2",
                                                         f"training.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.global_step == 2
    logs = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert all(f"rewards/research/{k}/mean" in logs[0] for k in ("answer_f1", "format", "searches"))
