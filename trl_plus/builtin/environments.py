"""The core's environments: ``turns``, a multi-turn test game that needs no tool-calling chat template (the tiny
offline model's cannot call tools), for tests and CPU examples of :class:`~trl_plus.Environment`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..contract import Environment, EnvironmentConfig


class TurnsConfig(EnvironmentConfig):
    """The ``turns`` game's settings."""

    max_turns: int = Field(2, ge=1, le=64, description="turns the policy writes per episode")
    observation: str = Field("\nAgain:", description="what the environment answers after every turn but the last")


class Turns(Environment):
    """A game of ``max_turns`` turns: the environment answers every turn with the same line, and its record of an
    episode is the policy's turns (``{"actions": [...], "turns": k}``)."""

    name = "turns"
    summary = "test game: max_turns turns of the policy, each answered by the same line; records the turns"
    Config = TurnsConfig

    def reset(self, prompt: Any, **columns: Any) -> dict[str, Any]:
        """An empty record."""
        return {"actions": []}

    def step(self, state: dict[str, Any], action: str) -> str:
        """Record the turn; answer with the configured line."""
        state["actions"].append(action)
        return self.config.observation

    def outcome(self, state: dict[str, Any]) -> dict[str, Any]:
        """The turns as written."""
        return {"actions": list(state["actions"]), "turns": len(state["actions"])}


ENVIRONMENTS = (Turns,)
