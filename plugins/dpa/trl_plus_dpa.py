"""DPA — Directional Preference Alignment (Wang et al., "Arithmetic Control of LLMs for Diverse User Preferences:
Directional Preference Alignment with Multi-Objective Rewards", arXiv 2402.18571, ACL 2024).

A user preference is a unit direction v = (cos θ, sin θ) in the space of k = 2 reward objectives (helpfulness,
verbosity), written into the system prompt as integer weights w_h = round(100·cos θ), w_v = round(100·sin θ)
(the released model's prompt). A multi-objective reward model r̃(x, y) ∈ R^k (a scorer with several outputs) scores
responses, and each iteration of preference-conditioned rejection-sampling fine-tuning (RSF) does:

    for each prompt x: draw θ, build prompt(v, x), sample y_1..y_N ~ π_θ(·|prompt(v, x)),
    y* = argmax_i v·r̃(x, y_i),
    then SFT (token-mean NLL of the assistant turn only) on (prompt(v, x), y*).

The loss is plain SFT (reference-free); the method lives in the data loop (:meth:`DPA.refresh`). With θ ≡ 0 it is
best-of-N RSF (RAFT) on helpfulness. The training code was never released: N, the number of iterations and the
direction distribution are the card's recommendations (N = 8, θ ~ U[−45°, 45°], from the model card's weights).
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

from pydantic import Field, model_validator

from trl_plus import (
    SFT,
    IterationContext,
    MethodConfig,
    Needs,
    OnlineMethod,
    Paper,
    Rollout,
    Rollouts,
    Scorer,
    hookimpl,
)

#: The released model's system prompt (Haoxiang-Wang/DPA-v1-Mistral-7B model card).
MODEL_CARD_PROMPT = ("You are a helpful, respectful, and honest assistant who always responds to the user in a harmless "
                     "way. Your response should maximize weighted rating = helpfulness*{w_h} + verbosity*{w_v}")


class DPAConfig(MethodConfig):
    """DPA's data-loop settings; the loss (SFT) has none. Sources: the model card (prompt, weights, |θ| ≤ 45°);
    the direction distribution is not given by the paper (the card recommends uniform θ in [−45°, 45°])."""

    min_angle: float = Field(-45.0, ge=-90, le=90, description="lowest θ in degrees (model card: w_h ≥ 71, |θ| ≤ 45°)")
    max_angle: float = Field(45.0, ge=-90, le=90, description="highest θ in degrees; min = max fixes the direction "
                             "(0: best-of-N RSF on helpfulness)")  # fmt: skip
    system_prompt: str = Field(MODEL_CARD_PROMPT, description="the direction prompt, with {w_h} and {w_v} (integer "
                               "weights round(100·cos θ), round(100·sin θ)); default the model card's")  # fmt: skip
    text_template: str = Field("{system}\n{prompt}", description="how a plain-text prompt carries the direction "
                               "prompt (chat prompts get it as their system message)")  # fmt: skip
    objectives: tuple[str, str] = Field(("helpfulness", "verbosity"), description="the two reward outputs v weighs, "
                                        "by name (a scorer output, or 'scorer/output')")  # fmt: skip

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_angle > self.max_angle:
            raise ValueError(f"min_angle {self.min_angle} exceeds max_angle {self.max_angle}")
        return self


# -- the direction ------------------------------------------------------------------------------------------------


def direction(theta: float) -> tuple[float, float]:
    """The unit preference direction v = (cos θ, sin θ) of an angle ``theta`` in degrees."""
    rad = math.radians(theta)
    return math.cos(rad), math.sin(rad)


def direction_weights(theta: float) -> tuple[int, int]:
    """The integer weights the prompt shows: (round(100·cos θ), round(100·sin θ)) — θ = −15° → (97, −26)."""
    v_h, v_v = direction(theta)
    return round(100 * v_h), round(100 * v_v)


def direction_prompt(prompt: Any, theta: float, config: DPAConfig) -> Any:
    """``prompt`` (text or chat messages) conditioned on direction θ: the system prompt with the integer weights, as
    the system message of a chat prompt (replacing one it had) or through ``text_template`` for plain text."""
    w_h, w_v = direction_weights(theta)
    system = config.system_prompt.format(w_h=w_h, w_v=w_v)
    if isinstance(prompt, list):
        return [{"role": "system", "content": system}, *[m for m in prompt if m.get("role") != "system"]]
    return config.text_template.format(system=system, prompt=prompt)


def preference_scores(rewards: Any, v: Any) -> Any:
    """``[N]`` v·r of each candidate's reward vector (``rewards`` ``[N, k]``, ``v`` ``[k]``)."""
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    return rewards @ torch.as_tensor(v, dtype=torch.float64)


def select(rewards: Any, v: Any) -> int:
    """argmax_i v·r_i (the first of ties; a NaN score never wins unless all are NaN)."""
    import torch

    scores = preference_scores(rewards, v)
    return int(torch.nan_to_num(scores, nan=-math.inf).argmax())


# -- the method ---------------------------------------------------------------------------------------------------


class DPA(OnlineMethod, SFT):
    """Direction-conditioned rejection-sampling fine-tuning: per iteration, N samples per (direction prompt, prompt),
    the best by v·r̃ kept, SFT on them (no reference)."""

    name = "dpa"
    family = "multi-objective"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "online", "learning.objective": "multi-objective",
                "constraint.reference": "reference-free", "property": (), "scope": "text",
                "source": "inferred"}  # fmt: skip
    paper = Paper("Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference Alignment with "
                  "Multi-Objective Rewards", "2402.18571", code="Haoxiang-Wang/directional-preference-alignment")
    summary = "direction-conditioned best-of-N SFT: argmax v·r of a vector reward, v in the system prompt"
    needs = Needs(reference="no", rollout=Rollout(n=8, when="iteration",
                                                  decoding={"temperature": 0.7, "max_new_tokens": 2048}))
    Config = DPAConfig
    #: ``trl-plus show dpa``'s example recipe: the rule vector reward (a real run names a k-head reward model)
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 16},
                                                 "scorers": [{"name": "toy-attributes"}]}

    def refresh(self, it: IterationContext) -> list[dict[str, Any]]:
        """Iteration ``it.index``'s SFT rows: every prompt gets a direction θ (uniform in [min_angle, max_angle],
        seeded by the run's seed, the iteration and the process), is re-tokenized with its direction prompt, sampled
        ``rollout.n`` times by the current policy and scored; :meth:`make_examples` keeps the argmax of v·r̃.
        Logs ``dpa/reward`` (mean v·r̃ of all samples: the generation-side reward), ``dpa/selected`` (of the
        kept ones) and ``dpa/<objective>`` (each objective's mean over all samples) with the iteration's first
        step."""
        trainer = it.trainer
        tokenizer = self.tokenizer or trainer.processing_class
        seed = f"{getattr(trainer.args, 'seed', 0)}-{it.index}-{trainer.accelerator.process_index}"
        rng = random.Random(seed)
        sums = {key: [0.0, 0] for key in ("reward", "selected", *self.config.objectives)}
        rows = []
        for batch in it.batches():
            conditioned = []
            for row in batch:
                theta = rng.uniform(self.config.min_angle, self.config.max_angle)
                prompt = direction_prompt(row["prompt"], theta, self.config)
                ids = self.tokenize({"prompt": prompt}, tokenizer)["prompt_ids"]
                columns = {**row.get("columns", {}), "angle": theta, "direction": list(direction(theta))}
                conditioned.append({"prompt_ids": ids, "prompt": prompt, "columns": columns})
            rollouts = it.sample(conditioned)
            made = self.make_examples(rollouts)
            scores = self.scores(rollouts)
            sums["reward"][0] += float(scores.nansum())
            sums["reward"][1] += int((~scores.isnan()).sum())
            sums["selected"][0] += sum(r["score"] for r in made)
            sums["selected"][1] += len(made)
            for objective, column in zip(self.config.objectives, self.objective_columns(rollouts)):
                values = rollouts.scores[:, column]
                sums[objective][0] += float(values.nansum())
                sums[objective][1] += int((~values.isnan()).sum())
            rows += made
        for key, (total, count) in sums.items():
            it.log(f"dpa/{key}", total / count if count else float("nan"))  # (every process logs every key)
        return rows

    def objective_columns(self, rollouts: Rollouts) -> list[int]:
        """The columns of ``rollouts.scores`` holding ``config.objectives`` (matched by score name or its output)."""
        names = list(rollouts.score_names)
        found = []
        for objective in self.config.objectives:
            hits = [i for i, n in enumerate(names) if n == objective or n.rsplit("/", 1)[-1] == objective]
            if len(hits) != 1:
                raise ValueError(f"dpa: objective {objective!r} matches {len(hits)} of the scorers' outputs "
                                 f"({', '.join(names)}); set method_args.objectives")  # fmt: skip
            found += hits
        return found

    def scores(self, rollouts: Rollouts) -> Any:
        """``[N]`` v·r̃ of every sample, v its prompt's direction (the ``direction`` column :meth:`refresh` sets)."""
        import torch

        if "direction" not in rollouts.columns:
            raise ValueError("dpa: the rollouts carry no direction column (DPA samples through refresh())")
        v = torch.tensor(rollouts.columns["direction"], dtype=torch.float64)  # [N, 2]
        rewards = rollouts.scores[:, self.objective_columns(rollouts)].double()
        return (rewards * v).sum(-1)

    def make_examples(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """One SFT row per prompt: its direction prompt's ids and the sample with the highest v·r̃ (first of ties),
        plus the direction (``angle``, ``direction``, the prompt's integer ``weights``), the kept sample's reward
        vector ``rewards`` and ``score`` v·r̃, and its text as ``messages`` for reading ``rows.jsonl``."""
        scores = self.scores(rollouts)
        objectives = self.objective_columns(rollouts)
        rows = []
        for g in range(rollouts.num_groups):
            members = rollouts.rows_of(g)
            values = scores[members]
            best = members[int(values.nan_to_num(nan=-math.inf).argmax())]
            theta = float(rollouts.columns["angle"][best])
            prompt, completion = rollouts.prompts[best], rollouts.completions[best]
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            rows.append({
                "prompt_ids": list(rollouts.prompt_ids[best]), "completion_ids": list(rollouts.completion_ids[best]),
                "angle": theta, "direction": list(rollouts.columns["direction"][best]),
                "weights": list(direction_weights(theta)),
                "rewards": [float(x) for x in rollouts.scores[best, objectives]], "score": float(scores[best]),
                "messages": [*messages, {"role": "assistant", "content": completion}],
            })  # fmt: skip
        return rows


# -- a rule vector reward (a real run: the core's reward-model scorer with several labels) ------------------------------------------------------------------------------------------------


class ToyAttributes(Scorer):
    """A rule vector reward for CPU runs and tests: ``helpfulness`` = digits in the completion, ``verbosity`` =
    letters in it (the two compete for the same characters, like helpfulness and verbosity in the paper's plane)."""

    name = "toy-attributes"
    summary = "a toy 2-objective reward: (digits, letters) of the completion, for tests"
    outputs: ClassVar[tuple[str, ...]] = ("helpfulness", "verbosity")

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        import torch

        texts = [c if isinstance(c, str) else "".join(str(m.get("content", "")) for m in c) for c in completions]
        return torch.tensor([[sum(ch.isdigit() for ch in t), sum(ch.isalpha() for ch in t)] for t in texts],
                            dtype=torch.float64)  # fmt: skip


@hookimpl
def register_methods(register):
    """Register ``dpa``."""
    register(DPA)


@hookimpl
def register_scorers(register):
    """Register ``toy-attributes``, the rule vector reward of tests and CPU runs (a k-head reward model is the core's
    ``reward-model`` with several labels)."""
    register(ToyAttributes)
