"""The deep-research RL survey's training recipe (Li et al., "Reinforcement Learning Foundations for Deep Research
Systems: A Survey", arXiv 2509.06733) as a runnable trl-plus recipe: a single planner trained by trajectory-level
group RL (GRPO, on :class:`~trl_plus.PlusGRPOTrainer`) on multi-turn tool use, with an outcome reward and a format
reward — the setting the survey argues suits closed-loop tool use better than SFT or DPO.

The survey defines no objective of its own, so the method is TRL's GRPO; what this plugin adds is the setting:

- ``offline-search``: a multi-turn :class:`~trl_plus.Environment` over a small offline corpus (shipped; a JSONL of
  ``{"title", "text"}`` documents of your own via ``corpus``). Each turn's first line is an action: ``search:
  <words>`` (the observation is the best-matching document by word overlap, or "no results"), or ``answer: <text>``
  (the episode ends). Anything else is an invalid action, answered with the syntax and counted.
- ``research``: a vector scorer of the episode's record with three outputs — ``answer_f1`` (SQuAD token F1 of the
  final answer against the data's ``answer`` column, multiplied by the format gate: 0 for an episode with an invalid
  action or no answer), ``format`` (1 when the episode is well-formed: every action valid and an answer given) and
  ``searches`` (the number of searches: a cost, weighted negative in the recipe).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from trl_plus import (
    GRPO,
    Environment,
    EnvironmentConfig,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Scorer,
    TrlPlusError,
    hookimpl,
)

__all__ = ["CORPUS", "DeepResearchSurvey", "OfflineSearch", "Research", "normalize_answer", "parse_action",
           "search", "token_f1", "words_of"]  # fmt: skip

#: The shipped corpus: short encyclopaedia-style documents the shipped questions need (``recipes/data``).
CORPUS: tuple[dict[str, str], ...] = (
    {"title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"title": "Canberra", "text": "Canberra is the capital city of Australia."},
    {"title": "Mount Everest", "text": "Mount Everest is the highest mountain on Earth, 8849 metres tall."},
    {"title": "Nile", "text": "The Nile is a river in Africa, about 6650 kilometres long."},
    {"title": "Jupiter", "text": "Jupiter is the largest planet of the Solar System."},
    {"title": "Water", "text": "Water boils at 100 degrees Celsius at sea level."},
    {"title": "Python", "text": "Python is a programming language first released in 1991."},
    {"title": "Moon landing", "text": "The first crewed Moon landing, Apollo 11, was in 1969."},
    {"title": "Tokyo", "text": "Tokyo is the capital of Japan."},
    {"title": "Oxygen", "text": "Oxygen has the atomic number 8."},
    {"title": "Ottawa", "text": "Ottawa is the capital city of Canada."},
    {"title": "Mars", "text": "Mars is called the Red Planet and has two moons, Phobos and Deimos."},
)

ACTION = re.compile(r"^\s*(search|answer)\s*:\s*(.*?)\s*$", re.IGNORECASE)
SYNTAX = "invalid action: write `search: <words>` or `answer: <text>`"


# -- pure functions (the card's example tests them) -----------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 of ``prediction`` against ``gold`` (after :func:`normalize_answer`); 1.0 when both are empty."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def parse_action(text: str) -> tuple[str, str] | None:
    """``("search" | "answer", argument)`` of a turn's first non-empty line, or ``None`` (an invalid action)."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    match = ACTION.match(line)
    return (match.group(1).lower(), match.group(2)) if match else None


def words_of(corpus: tuple[dict[str, str], ...] | list[dict[str, str]]) -> list[set[str]]:
    """Each document's normalised words (title and text), for :func:`search`."""
    return [set(normalize_answer(f"{doc['title']} {doc['text']}").split()) for doc in corpus]


def search(corpus: tuple[dict[str, str], ...] | list[dict[str, str]], query: str,
           words: list[set[str]] | None = None) -> str | None:  # fmt: skip
    """The document (``"title: text"``) sharing the most normalised words with ``query`` (ties: the first), or
    ``None`` when none shares any; ``words``: :func:`words_of` the corpus, computed once by the environment."""
    wanted = set(normalize_answer(query).split())
    overlaps = [len(wanted & doc_words) for doc_words in (words if words is not None else words_of(corpus))]
    best = max(range(len(overlaps)), key=lambda i: (overlaps[i], -i), default=None)
    if best is None or overlaps[best] == 0:
        return None
    return f"{corpus[best]['title']}: {corpus[best]['text']}"


# -- the environment ----------------------------------------------------------------------------------------------


class OfflineSearchConfig(EnvironmentConfig):
    """The offline search environment's settings."""

    max_turns: int = Field(4, ge=1, le=64, description="turns per episode (searches + the answer)")
    corpus: str | None = Field(None, description="a JSONL file of {title, text} documents (null: the shipped one)")
    max_observation_chars: int = Field(200, ge=1, description="a document is cut to this many characters")


class OfflineSearch(Environment):
    """``search: <words>`` → the best-matching document; ``answer: <text>`` ends the episode (module docstring)."""

    name = "offline-search"
    summary = "a search tool over a small offline corpus: search: <words> / answer: <text>; records answer, searches"
    Config = OfflineSearchConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.corpus = CORPUS if self.config.corpus is None else self._read(self.config.corpus)
        self.words = words_of(self.corpus)  # normalised once, not per search

    @staticmethod
    def _read(path: str) -> list[dict[str, str]]:
        file = Path(path)
        if not file.is_file():
            raise TrlPlusError(f"rollout.environment.args.corpus: {path} is not a file (a JSONL of {{title, text}})")
        docs = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        bad = next((i for i, d in enumerate(docs, 1) if not {"title", "text"} <= set(d)), None)
        if bad is not None:
            raise TrlPlusError(f"rollout.environment.args.corpus: {path} line {bad} lacks a title or a text field")
        return docs

    def reset(self, prompt: Any) -> dict[str, Any]:
        """An empty record."""
        return {"answer": None, "searches": [], "invalid": 0, "turns": 0}

    def step(self, state: dict[str, Any], action: str) -> str | None:
        """Search, answer (the end) or the syntax of a valid action."""
        state["turns"] += 1
        parsed = parse_action(action)
        if parsed is None:
            state["invalid"] += 1
            return "\n" + SYNTAX + "\n"
        kind, argument = parsed
        if kind == "answer":
            state["answer"] = argument
            return None
        state["searches"].append(argument)
        found = search(self.corpus, argument, self.words)
        return "\n" + (found or "no results")[: self.config.max_observation_chars] + "\n"

    def outcome(self, state: dict[str, Any]) -> dict[str, Any]:
        """The answer (``None``: none given), the searches, the invalid actions, the turns and ``format_ok``."""
        return {**state, "searches": list(state["searches"]),
                "format_ok": state["answer"] is not None and state["invalid"] == 0}  # fmt: skip


# -- the reward -----------------------------------------------------------------------------------------------------


class ResearchConfig(MethodConfig):
    """The ``research`` scorer's settings."""

    gate: bool = Field(True, description="answer_f1 × format_ok (the card: an ill-formed episode earns no F1)")


class Research(Scorer):
    """Outcome and format rewards of an ``offline-search`` episode: ``answer_f1``, ``format``, ``searches``."""

    name = "research"
    summary = "offline-search episodes: answer token-F1 vs the answer column (format-gated), format, search count"
    outputs = ("answer_f1", "format", "searches")
    columns = ("episode", "answer")
    Config = ResearchConfig

    def score(self, prompts: list, completions: list, episode: list, answer: list) -> Any:
        """``[N, 3]``: F1 (× the format gate), format (0/1), searches."""
        import torch

        rows = []
        for record, gold in zip(episode, answer, strict=True):
            ok = bool(record.get("format_ok"))
            f1 = token_f1(record.get("answer") or "", str(gold)) if record.get("answer") is not None else 0.0
            rows.append([f1 * ok if self.config.gate else f1, float(ok), float(len(record.get("searches", ())))])
        return torch.tensor(rows, dtype=torch.float64)


# -- the method ---------------------------------------------------------------------------------------------------


class DeepResearchSurvey(GRPO):
    """TRL's GRPO on multi-turn episodes of a search environment with outcome and format rewards: the survey's
    recipe for training a deep-research planner (module docstring). No loss of its own."""

    name = "deep-research-survey"
    family = "data-recipe"
    summary = "the survey's agentic-search recipe: GRPO over multi-turn search episodes, outcome + format rewards"
    paper = Paper("Reinforcement Learning Foundations for Deep Research Systems: A Survey", "2509.06733")
    taxonomy = {"data.feedback": "point", "data.granularity": "turn", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "agent", "source": "inferred"}  # fmt: skip
    needs = Needs(reference="optional", precomputable_reference=False,
                  rollout=Rollout(n=8, decoding={"max_new_tokens": 128, "temperature": 1.0}))  # fmt: skip
    data_fields: ClassVar[tuple[str, ...]] = ("prompt", "answer")
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/search_questions.jsonl"}
    example_rollout: ClassVar[dict[str, Any]] = {
        "n": 4, "decoding": {"max_new_tokens": 16},
        "scorers": [{"name": "research", "weight": [1.0, 0.2, -0.05]}],
        "environment": {"name": "offline-search", "args": {"max_turns": 3}}}  # fmt: skip


@hookimpl
def register_methods(register):
    """Register ``deep-research-survey``."""
    register(DeepResearchSurvey)


@hookimpl
def register_environments(register):
    """Register ``offline-search``."""
    register(OfflineSearch)


@hookimpl
def register_scorers(register):
    """Register ``research``."""
    register(Research)
