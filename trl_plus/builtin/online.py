"""``OnlineMethod``: the base of methods that write their own training pairs (``Needs.rollout``): prompts in,
completions sampled by the trainer's rollout stage (``trl_plus.trainers.rollout``), ranked by the recipe's scorers,
turned into rows by :meth:`~trl_plus.Method.make_examples`, then the method's ordinary loss."""

from __future__ import annotations

from typing import Any, ClassVar

from ..contract import Method, Needs, Rollout
from ..data.tokenize import tokenize_prompt


class OnlineMethod(Method):
    """A method trained on its own samples. Subclass it together with the loss it uses offline, e.g.
    ``class OnlineDPO(OnlineMethod, DPO)``: the data are prompts (``data_fields = ("prompt",)``; other columns
    reach the scorers that read them), and every step samples ``needs.rollout.n`` completions per prompt and source
    (the recipe's ``rollout:`` block may change them and names the scorers). The reference cannot be precomputed:
    the sequences change every step."""

    family: ClassVar[str] = "online-generation"
    needs: ClassVar[Needs] = Needs(rollout=Rollout(), precomputable_reference=False)
    data_fields: ClassVar[tuple[str, ...]] = ("prompt",)
    tokenize = staticmethod(tokenize_prompt)
    tokenized_columns: ClassVar[tuple[str, ...]] = ("prompt_ids",)
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/online_prompts.jsonl"}
    #: The ``rollout:`` block of the example recipe ``trl-plus show`` prints (a rule scorer: runs on the CPU).
    example_rollout: ClassVar[dict[str, Any]] = {"decoding": {"max_new_tokens": 16}, "scorers": [{"name": "digits"}]}

    @classmethod
    def required_columns(cls) -> tuple[str, ...]:
        """The prompt columns only: an online method's ``needs.fields`` are written by :meth:`make_examples`, not
        read from the data."""
        lists = tuple(f.name for f in cls.needs.lists if f.required)
        return tuple(dict.fromkeys(cls.data_fields + lists))
