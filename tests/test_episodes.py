"""Multi-turn episodes (``rollout.environment``, ``trl_plus.trainers.episodes``): each sample is played turn by turn,
the environment's observations are tokens the loss never sees, every policy token carries its turn, the episode's
record reaches the scorers, episodes end when the environment says so or at ``max_turns``, per-turn sums and the
turn ratio, a second trainable adapter, and bad environments or recipes are one-line errors."""

from __future__ import annotations

import pytest
import torch

from trl_plus import Environment, EnvironmentConfig, GroupMethod, Paper, Rollout, Scorer, TrlPlusError, get_registry
from trl_plus.testing import registered, tiny_group_trainer, tiny_recipe

ROWS = [{"prompt": f"Count to {i}:", "turns": 1 + i % 3} for i in range(16)]


class Countdown(Environment):
    """Ends after the row's ``turns`` turns; answers turn t with ``[t]``; records the actions it saw."""

    name = "countdown-test"
    columns = ("turns",)
    seen: list = []

    def reset(self, prompt, turns):
        return {"left": turns, "actions": [], "prompt": prompt}

    def step(self, state, action):
        state["actions"].append(action)
        state["left"] -= 1
        Countdown.seen.append(action)
        return None if state["left"] == 0 else f"[{len(state['actions'])}]"

    def outcome(self, state):
        return {"actions": state["actions"], "prompt": state["prompt"]}


class EpisodeTurns(Scorer):
    """The number of turns in the episode's record (reads the ``episode`` column)."""

    name = "episode-turns-test"
    columns = ("episode",)

    def score(self, prompts, completions, episode):
        return torch.tensor([float(len(e["actions"])) for e in episode])


class Recording(GroupMethod):
    name = "recording-episodes-test"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")
    SEEN: list = []

    def advantages(self, rollouts, baseline):
        Recording.SEEN.append(rollouts)
        return None


def play(tmp_path, environment, rows=ROWS, steps=1, scorers=None, **rollout):
    Recording.SEEN.clear()
    Countdown.seen.clear()
    t = tiny_group_trainer(Recording, tmp_path, rows=rows, max_steps=steps, scorers=scorers,
                           rollout=Rollout(n=4, decoding={"max_new_tokens": 5, "temperature": 1.0}, environment=environment,
                                           **rollout))  # fmt: skip
    outputs = []
    generate = t._generate_and_score_completions
    t._generate_and_score_completions = lambda inputs: outputs.append((inputs, generate(inputs))) or outputs[-1][1]
    t.train()
    return t, outputs


def test_episodes_play_turn_by_turn_with_masked_observations(tmp_path, one_thread):
    environment = Countdown(EnvironmentConfig(max_turns=4))
    t, outputs = play(tmp_path, environment, scorers=[(EpisodeTurns(), 1.0)])
    tokenizer = t.processing_class
    inputs, output = outputs[0]
    rollouts = Recording.SEEN[0]
    assert len(inputs) == 8 and torch.equal(rollouts.turn_ids, output["turn_ids"].cpu())
    for i, row in enumerate(inputs):
        ids = output["completion_ids"][i][output["completion_mask"][i].bool()].tolist()
        turns = output["turn_ids"][i][: len(ids)].tolist()
        env = output["tool_mask"][i][: len(ids)].tolist()
        assert env == [int(t >= 0) for t in turns]  # the observations are out of the loss (TRL's tool_mask)
        actions = row["episode"]["actions"]
        assert len(actions) == row["turns"]  # the environment ended the episode after the row's turns
        assert max(turns) == row["turns"] - 1 and sorted(set(turns) - {-1}) == list(range(row["turns"]))
        for k, action in enumerate(actions):  # each turn's tokens decode to what the environment was shown
            assert tokenizer.decode([x for x, tt in zip(ids, turns) if tt == k], skip_special_tokens=True) == action
        observed = [x for x, tt in zip(ids, turns) if tt == -1]  # the observations' own tokens, in order
        assert observed == [c for k in range(1, row["turns"]) for c in tokenizer(f"[{k}]", add_special_tokens=False)[
            "input_ids"]]  # fmt: skip
    # the episode's record reached the scorer: its reward is the turn count
    assert rollouts.scores[:, 0].tolist() == [float(row["turns"]) for row in inputs]
    assert "episode" in rollouts.columns and "turn_ids" not in rollouts.columns


def test_max_turns_ends_every_episode_and_drops_the_last_observation(tmp_path, one_thread):
    turns = get_registry().get_environment("turns")({"max_turns": 3, "observation": "|"})
    t, outputs = play(tmp_path, turns)
    inputs, output = outputs[0]
    for i, row in enumerate(inputs):
        width = int(output["completion_mask"][i].sum())
        ids = output["completion_ids"][i][:width].tolist()
        assert row["episode"]["turns"] == 3
        assert max(output["turn_ids"][i][:width].tolist()) == 2
        assert ids.count(t.processing_class.convert_tokens_to_ids("|")) >= 2  # two observations; none after turn 3
        assert output["turn_ids"][i][width - 1].item() == 2  # the completion ends with the policy's last turn


def test_a_chat_models_observation_is_a_user_message():
    from trl_plus.models.tiny import build_tokenizer
    from trl_plus.trainers.episodes import observation_ids

    tokenizer = build_tokenizer()
    ids = observation_ids(tokenizer, "ok", conversational=True)
    assert tokenizer.decode(ids) == "<|user|>ok</s><|assistant|>"
    assert tokenizer.decode(observation_ids(tokenizer, "ok", conversational=False)) == "ok"


def test_turn_sums_and_the_turn_ratio():
    from trl_plus import GroupContext, MethodConfig, turn_sums

    turn_ids = torch.tensor([[0, 0, -1, 1, -1], [-1, -1, -1, -1, -1]])
    values = torch.tensor([[1.0, 2.0, 100.0, 4.0, 100.0], [7.0, 7.0, 7.0, 7.0, 7.0]])
    sums, present = turn_sums(values, turn_ids)
    assert sums.tolist() == [[3.0, 4.0], [0.0, 0.0]] and present.tolist() == [[True, True], [False, False]]
    ctx = GroupContext(token_logps=values * 0.01, old_token_logps=torch.zeros(2, 5), mask=(turn_ids >= 0).float(),
                       advantages=torch.zeros(2), config=MethodConfig(), rows_per_update=2, turn_ids=turn_ids)  # fmt: skip
    assert torch.allclose(ctx.ratio("turn"), torch.exp(torch.tensor([[0.03, 0.04], [0.0, 0.0]])), atol=1e-6)
    with pytest.raises(ValueError, match="multi-turn"):
        GroupContext(token_logps=values, old_token_logps=values, mask=values, advantages=values[:, 0],
                     config=MethodConfig(), rows_per_update=2).ratio("turn")  # fmt: skip


class Raising(Environment):
    name = "raising-test"

    def reset(self, prompt):
        return {}

    def step(self, state, action):
        raise KeyError("no such room")


def test_an_environment_that_raises_or_lacks_a_column_is_one_line(tmp_path):
    with pytest.raises(TrlPlusError, match=r"rollout.environment: raising-test raised in step\(\) on turn 0 for "
                                           r"prompt 'Count to \d+:': KeyError: 'no such room'"):  # fmt: skip
        play(tmp_path / "a", Raising())
    with pytest.raises(TrlPlusError, match=r"countdown-test reads the data column\(s\) turns, which the data lacks"):
        play(tmp_path / "b", Countdown(), rows=[{"prompt": f"Count to {i}:"} for i in range(8)])


def test_a_recipe_names_its_environment_and_bad_ones_are_one_line(tmp_path):
    from trl_plus import check_recipe, load_recipe
    from trl_plus.run.validate import build_rollout

    def recipe(environment, method="grpo"):
        path = tiny_recipe(tmp_path, method, ROWS, rollout={"n": 2, "scorers": [{"name": "digits"}],
                                                            "environment": environment})  # fmt: skip
        return load_recipe(path)

    with registered(environments=[Countdown]):
        rollout, _ = build_rollout(recipe({"name": "countdown-test", "args": {"max_turns": 3}}), GRPO_CLASS())
        assert isinstance(rollout.environment, Countdown) and rollout.environment.config.max_turns == 3
    with pytest.raises(TrlPlusError, match=r"recipe.yaml: rollout.environment.name: unknown environment "
                                           r"'turn' \(did you mean turns\?\)"):  # fmt: skip
        check_recipe(recipe({"name": "turn"}))
    with pytest.raises(TrlPlusError, match=r"rollout.environment.args.max_turns"):
        check_recipe(recipe({"name": "turns", "args": {"max_turns": 0}}))
    with pytest.raises(TrlPlusError, match=r"rollout.environment: multi-turn episodes are played by group methods"):
        from trl_plus import DPO, OnlineMethod

        class Online(OnlineMethod, DPO):
            name = "online-episodes-test"
            paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")

        with registered(Online):
            check_recipe(recipe({"name": "turns"}, method="online-episodes-test"))


def GRPO_CLASS():
    return get_registry().get("grpo")


def test_list_environments(capsys):
    from trl_plus.testing import cli

    assert cli("list", "--environments") == 0
    out = capsys.readouterr().out
    assert "turns" in out and "test game" in out
