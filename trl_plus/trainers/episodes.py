"""Multi-turn episodes for group methods: an :class:`~trl_plus.Environment` played through TRL's ``rollout_func``.

TRL's ``GRPOTrainer`` hands ``rollout_func(prompts, trainer)`` this process's prompts (already repeated
``num_generations`` times by its sampler) and expects ``prompt_ids``, ``completion_ids`` and ``logprobs`` back;
``env_mask`` (1 on the policy's tokens, 0 on the environment's) becomes its ``tool_mask``, so the loss and the
completion lengths skip observation tokens; every other key reaches the reward functions as a column. Here each
sample is one episode:

1. the environment's :meth:`~trl_plus.Environment.reset` for the prompt and its row's columns;
2. per turn, every unfinished episode's history (prompt + turns + observations, token ids as sampled, never
   re-tokenised) is extended by TRL's own one-turn generation (``_generate_single_turn``: the same decoding, vLLM
   or transformers, gradient checkpointing off, left padding) by at most ``decoding.max_new_tokens`` tokens;
3. :meth:`~trl_plus.Environment.step` reads the turn's text and answers with an observation (appended as tokens
   the policy did not write) or ends the episode; ``max_turns`` ends it too.

The returned columns are ``turn_ids`` (per completion token: the turn, −1 on observation tokens) and ``episode``
(:meth:`~trl_plus.Environment.outcome`). An environment that raises stops the run with one line naming it, the
turn and the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..contract import Environment
from ..errors import TrlPlusError


def _call(environment: Environment, what: str, turn: int | None, prompt: Any, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TrlPlusError:
        raise
    except Exception as exc:  # an environment of a plugin: say which one, where
        at = f" on turn {turn}" if turn is not None else ""
        raise TrlPlusError(f"rollout.environment: {environment.name} raised in {what}(){at} for prompt "
                           f"{str(prompt)[:60]!r}: {type(exc).__name__}: {exc}") from exc  # fmt: skip


def observation_encoder(tokenizer: Any, conversational: bool) -> Callable[[str], list[int]]:
    """``text -> token ids`` of an observation: with a chat model, ``text`` as a ``user`` message followed by the
    assistant's generation prompt (the template's own tokens, as the difference of two renderings, the fixed one
    rendered once); else its plain tokens."""
    if not conversational:
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    before = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    prefix = tokenizer.apply_chat_template(before, tokenize=True, return_dict=False)
    eos = tokenizer.eos_token_id  # the assistant's turn ends at its EOS, which the policy wrote itself
    cut = max((i + 1 for i, t in enumerate(prefix) if t == eos), default=len(prefix))

    def encode(text: str) -> list[int]:
        full = tokenizer.apply_chat_template([*before, {"role": "user", "content": text}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)  # fmt: skip
        if full[:cut] != prefix[:cut]:
            raise TrlPlusError("rollout.environment: the chat template renders a conversation's start differently "
                               "once a user message follows; observations cannot be appended as tokens")  # fmt: skip
        return list(full[cut:])

    return encode


def observation_ids(tokenizer: Any, text: str, conversational: bool) -> list[int]:
    """The token ids of one observation (:func:`observation_encoder`)."""
    return observation_encoder(tokenizer, conversational)(text)


def play(trainer: Any, environment: Environment, prompts: list, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Play one episode per prompt with ``trainer``'s policy; the ``rollout_func`` output (see the module doc)."""
    from trl.data_utils import is_conversational

    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    encode = observation_encoder(tokenizer, is_conversational({"prompt": prompts[0]}))
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    states = []
    for prompt, row in zip(prompts, rows, strict=True):
        missing = [c for c in environment.columns if c not in row]
        if missing:
            raise TrlPlusError(f"rollout.environment: {environment.name} reads the data column(s) "
                               f"{', '.join(missing)}, which the data lacks")  # fmt: skip
        columns = {c: row[c] for c in environment.columns}
        states.append(_call(environment, "reset", None, prompt, environment.reset, prompt, **columns))
    n = len(prompts)
    completion = [[] for _ in range(n)]
    env_mask = [[] for _ in range(n)]
    turn_ids = [[] for _ in range(n)]
    logprobs: list[list[float]] | None = [[] for _ in range(n)]
    active = list(range(n))
    last = environment.config.max_turns - 1
    for turn in range(last + 1):
        histories = [list(prompt_ids[i]) + completion[i] for i in active]
        new, new_logprobs = trainer._generate_single_turn(histories, None, {}, 1)
        if new_logprobs is None:
            logprobs = None
        still = []
        for j, i in enumerate(active):
            action = list(new[j])
            completion[i] += action
            env_mask[i] += [1] * len(action)
            turn_ids[i] += [turn] * len(action)
            if logprobs is not None:
                logprobs[i] += list(new_logprobs[j])
            text = tokenizer.decode(action, skip_special_tokens=True)
            observation = _call(environment, "step", turn, prompts[i], environment.step, states[i], text)
            if observation is None or turn == last:
                continue
            ids = encode(str(observation))
            completion[i] += ids
            env_mask[i] += [0] * len(ids)
            turn_ids[i] += [-1] * len(ids)
            if logprobs is not None:
                logprobs[i] += [0.0] * len(ids)
            still.append(i)
        active = still
        if not active:
            break
    episodes = [_call(environment, "outcome", None, p, environment.outcome, s) for p, s in zip(prompts, states)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion, "logprobs": logprobs, "env_mask": env_mask,
            "turn_ids": turn_ids, "episode": episodes}  # fmt: skip
