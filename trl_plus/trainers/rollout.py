"""The rollout stage of online methods (``Needs.rollout``): before each step, sample completions of the batch's
prompts, score them, and turn them into the method's training rows — so an online method's loss is the offline
one, unchanged (online DPO is DPO's loss on pairs the policy just wrote).

One stage, in :meth:`RolloutMixin._prepare_inputs`:

1. the data loader hands over prompt rows (``trl_plus.PromptCollator``: token ids, the prompt text, the data
   columns scorers read);
2. :meth:`RolloutMixin.generate` samples ``n`` completions per prompt from each source — the policy, the
   reference (the policy with its adapter off, the frozen ``ref`` adapter, or the reference model; never
   ``get_base_model()``, which still carries LoRA) — under ``torch.no_grad()``, with gradient checkpointing off and
   the KV cache on (TRL's ``unwrap_model_for_generation``), prompts left-padded, cut after the first EOS, and a seed
   of its own per process and step (the training RNG is left untouched); ``column:<name>`` sources take a data
   column's text as a completion;
3. the recipe's scorers score every completion; :class:`~trl_plus.Rollouts` carries the sampled token ids (never
   re-tokenized text), texts, groups, sources, scores and EOS flags to :meth:`Method.make_examples`;
4. the method's collator collates those rows, and the step runs as for offline data. The stage's figures are
   logged as ``rollout/*`` (``rollout/reward`` is the generation-side reward an online run improves).

A step where the method's filters leave a process no row still runs there, on stand-in rows with its loss
multiplied by 0 (``rollout/empty``): under ``accelerate launch`` the other processes wait for its gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import use_adapter

from ..contract import Method, Rollout, Rollouts, Scorer, check_decoding
from ..data.collate import PROMPT_ROWS
from ..errors import TrlPlusError
from .adapters import REFERENCE_ADAPTER, active_adapter


class RolloutMixin:
    """What :class:`~trl_plus.PlusTrainer` adds for online methods (see the module docstring)."""

    rollout: Rollout | None = None
    scorers: tuple[tuple[Scorer, float], ...] = ()
    rollout_seed_offset: int = 0  # the iteration driver gives each generation batch its own seed

    def set_rollout(self, scorers: Sequence[tuple[Scorer, float]], rollout: Rollout | None = None) -> None:
        """The scorers (with weights) of the run's rollouts and, optionally, a :class:`~trl_plus.Rollout` replacing
        the method's (the recipe's ``rollout:`` block)."""
        rollout = rollout or self.method.needs.rollout
        if rollout is None:
            raise TrlPlusError(f"method {self.method.name!r} samples nothing (it has no Needs.rollout): drop the "
                               "recipe's rollout: block")  # fmt: skip
        if not scorers:
            raise TrlPlusError(f"method {self.method.name!r} ranks its samples by scorers: give rollout.scorers, e.g. "
                               "[{name: reward-model, args: {model: DIR}}] (trl-plus list --scorers)")  # fmt: skip
        for source in rollout.sources:
            if source == "reference" and self.reference_mode == "none":
                raise TrlPlusError("rollout.sources: reference: this run has no reference to sample from")
            if source not in ("policy", "reference") and not source.startswith("column:"):
                raise TrlPlusError(f"rollout.sources: {source!r} is not policy, reference or column:<name>")
        check_decoding(rollout.decoding)
        self.rollout, self.scorers = rollout, tuple(scorers)
        for scorer, _ in self.scorers:
            scorer.tokenizer = scorer.tokenizer or self._tokenizer
            scorer.device = scorer.device or self.accelerator.device
        self._rollout_logs: dict[str, list[float]] = {}

    # -- the stage -------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        if isinstance(inputs, Mapping) and PROMPT_ROWS in inputs:
            rollouts = self.rollout_stage(inputs[PROMPT_ROWS])
            rows = [dict(row) for row in self.method.make_examples(rollouts)]
            self.empty_step = not rows
            self.log_metric("rollout/empty", float(self.empty_step))  # every process logs: the mean is collective
            if rows:
                self._last_rows = rows
            else:  # the method's filters left nothing: still run a step (see _stand_in_rows)
                rows = self._stand_in_rows(rollouts)
            inputs = self.method_collator(rows)
        return super()._prepare_inputs(inputs)

    empty_step: bool = False  # this step's rows are stand-ins: its loss is multiplied by 0 (see _stand_in_rows)

    def _stand_in_rows(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """Rows for a step whose samples gave the method none (every pair filtered out, say). Skipping the step on
        this process would hang the others in their gradient all-reduce under ``accelerate launch``, so the step runs
        on stand-in rows — the last step's rows, or the core's best-vs-worst pairs of these samples — with its loss
        multiplied by 0: the same forward and backward on every process, no gradient from this one
        (``rollout/empty`` logs the share of such steps)."""
        rows = getattr(self, "_last_rows", None)
        if rows is None:
            rows = [dict(row) for row in Method.make_examples(self.method, rollouts)]
        if not rows:
            raise TrlPlusError(f"method {self.method.name!r}: make_examples built no training row from the first "
                               "step's samples, and one sample per prompt gives no stand-in pair: set rollout.n ≥ 2")
        return rows

    def rollout_stage(self, prompt_rows: list[dict[str, Any]]) -> Rollouts:
        """Sample, decode and score completions of ``prompt_rows`` (as the prompt collator gives them)."""
        rollout = self.rollout
        group, source, prompt_ids, completion_ids, eos = [], [], [], [], []
        eos_ids = self._eos_ids()
        samples = {}
        for name in rollout.sources:
            if name.startswith("column:"):
                continue
            ids = [row["prompt_ids"] for row in prompt_rows for _ in range(rollout.n)]
            samples[name] = self.generate(ids, name)
        for g, row in enumerate(prompt_rows):
            for name in rollout.sources:
                if name.startswith("column:"):
                    completions = [self._column_completion(row, name[len("column:"):])]
                else:
                    completions = samples[name][g * rollout.n : (g + 1) * rollout.n]
                for ids in completions:
                    group.append(g)
                    source.append(name)
                    prompt_ids.append(list(row["prompt_ids"]))
                    completion_ids.append(ids)
                    eos.append(bool(ids) and ids[-1] in eos_ids)
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [prompt_rows[g]["prompt"] for g in group]
        columns = {name: [prompt_rows[g]["columns"].get(name) for g in group]
                   for name in prompt_rows[0]["columns"]}  # fmt: skip
        scores, names, weights = self._score(prompts, texts, columns)
        rollouts = Rollouts(
            prompt_ids=prompt_ids, completion_ids=completion_ids, prompts=prompts, completions=texts,
            group=torch.tensor(group), source=source, scores=scores, weights=weights,
            eos=torch.tensor(eos), lengths=torch.tensor([len(c) for c in completion_ids], dtype=torch.float64),
            columns=columns, score_names=names,
        ).penalize_missing_eos(rollout.missing_eos_penalty)  # fmt: skip
        self._log_rollouts(rollouts)
        return rollouts

    def _score(self, prompts: list, texts: list[str], columns: dict[str, list]):
        outputs, names, weights = [], [], []
        for scorer, weight in self.scorers:
            missing = [c for c in scorer.columns if c not in columns]
            if missing:
                raise TrlPlusError(f"rollout.scorers: {scorer.name} reads the data column(s) {', '.join(missing)}, "
                                   "which the prompts lack")  # fmt: skip
            value = scorer.checked_scores(prompts, texts, **{c: columns[c] for c in scorer.columns})
            outputs.append(value)
            names += [f"{scorer.name}/{o}" if len(scorer.outputs) > 1 else scorer.name for o in scorer.outputs]
            weights += scorer.output_weights(weight)
        return torch.cat(outputs, -1), tuple(names), torch.tensor(weights, dtype=torch.float64)

    def _column_completion(self, row: dict[str, Any], column: str) -> list[int]:
        from ..data.tokenize import tokenize_completions

        if column not in row["columns"]:
            raise TrlPlusError(f"rollout.sources: column:{column}: the prompts have no column {column!r}")
        return tokenize_completions(self._tokenizer, row["prompt"], {"y": row["columns"][column]})["y"]

    def _log_rollouts(self, rollouts: Rollouts) -> None:
        reward = rollouts.reward()
        for name in dict.fromkeys(rollouts.source):
            rows = [i for i, s in enumerate(rollouts.source) if s == name]
            suffix = "" if len(set(rollouts.source)) == 1 else f"_{name.replace(':', '_')}"
            self.log_metric(f"rollout/reward{suffix}", reward[rows].mean())
        self.log_metric("rollout/eos", rollouts.eos.double().mean())
        self.log_metric("rollout/length", rollouts.lengths.mean())

    def log_metric(self, name: str, value: Any) -> None:
        """Log ``value`` (a number or 0-d tensor) as ``name`` with the next logged step, averaged over processes
        (so every process calls it) and over the calls since the last log."""
        self._metrics["train" if self.model.training else "eval"][name].append(self._gathered_mean(value))

    # -- generation --------------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        config = self.accelerator.unwrap_model(self.model).generation_config
        ids = config.eos_token_id if config is not None else None
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        return ids | {self._tokenizer.eos_token_id}

    def decoding(self) -> dict[str, Any]:
        """The generation settings of the run's rollouts (the method's or the recipe's ``rollout.decoding``)."""
        return {"do_sample": True, **self.rollout.decoding}

    def generate(self, prompt_ids: list[list[int]], source: str = "policy") -> list[list[int]]:
        """Completion token ids of ``prompt_ids`` (one per row) sampled from ``source`` (``policy`` or
        ``reference``), each cut after its first EOS (kept)."""
        from transformers import GenerationConfig

        tokenizer = self._tokenizer
        pad = tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        device = self.accelerator.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
        eos_ids = sorted(self._eos_ids())
        try:
            config = GenerationConfig(**self.decoding(), eos_token_id=eos_ids, pad_token_id=pad, use_cache=True)
            config.validate(strict=True)
        except (ValueError, TypeError) as exc:
            raise TrlPlusError(f"rollout.decoding: {str(exc).splitlines()[0]}") from None
        model, context = self._generation_source(source)
        seed = (int(self.args.seed) + 7919 * self.accelerator.process_index + 104729 * (self.state.global_step + 1)
                + self.rollout_seed_offset)  # fmt: skip
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            context(),
            unwrap_model_for_generation(model, self.accelerator,
                                        gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs) as unwrapped,
            torch.no_grad(),
        ):  # fmt: skip
            torch.manual_seed(seed)
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                out = unwrapped.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
            finally:
                unwrapped.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), None)
            completions.append(row[:cut] if cut is not None else [t for t in row if t != pad] if pad not in eos_ids
                               else row)  # fmt: skip
        return completions

    def _generation_source(self, source: str):
        """``(model, context)`` to sample ``source`` from: the policy as it is, or the reference."""
        if source == "policy":
            return self.model, contextlib.nullcontext
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext
        policy = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(policy):
            raise TrlPlusError("rollout.sources: reference: sampling the reference needs a reference model or a LoRA "
                               "policy (adapter off); this run has neither")  # fmt: skip
        if REFERENCE_ADAPTER in policy.peft_config:
            return self.model, lambda: active_adapter(policy, REFERENCE_ADAPTER)
        return self.model, lambda: use_adapter(policy, adapter_name=None)

