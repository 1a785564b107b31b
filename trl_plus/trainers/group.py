"""``PlusGRPOTrainer``: group-RL methods (:class:`~trl_plus.GroupMethod`) on TRL's ``GRPOTrainer``.

TRL's trainer keeps what it owns — cross-process grouping (``RepeatSampler``), the generation batch reused over
``steps_per_generation × num_iterations`` micro-steps, old log-probs, vLLM, tools and environments, the loss
normalisers. This subclass adds trl-plus's side, in four places:

1. ``__init__``: the method (registry, validated ``Config``), its ``Rollout`` (``n`` → ``num_generations``,
   ``decoding`` → ``max_completion_length`` / ``temperature`` / ``top_p`` / ... / ``generation_kwargs``), the
   recipe's scorers as TRL reward functions (each output one function; a vector scorer runs one forward per batch
   for all of them) with their weights as ``reward_weights``, and the method's ``beta``; then the method's
   :meth:`~trl_plus.GroupMethod.grpo_config` adjusts the ``GRPOConfig``. With ``beta > 0`` and no
   LoRA the reference is a frozen copy of the starting policy (or the ``ref_model`` given): TRL would reload one
   from ``config._name_or_path`` — impossible for a model built in memory, and a 16-bit copy of a 4-bit one.
2. ``_calculate_rewards``: keeps the gathered ``[N, S]`` per-scorer scores (TRL's output drops them).
3. ``_generate_and_score_completions``: after TRL's, builds the generation batch's :class:`~trl_plus.Rollouts`
   (every process's rows gathered: ids, texts, groups, scores, lengths, EOS, optional old log-probs) and asks the
   method for :meth:`~trl_plus.GroupMethod.advantages`; ``[N]`` or ``[N, T]`` (TRL's loss takes ``(B, T)``
   advantages "to support subclasses": a tolerated path, pinned by ``tests/test_group.py``), sliced to this
   process's rows.
4. ``_compute_loss``: the method's :meth:`~trl_plus.GroupMethod.loss` on a :class:`~trl_plus.GroupContext`, or
   TRL's surrogate.

``rollout/reward`` (the weighted reward of the generation batch) is logged as for every online method, beside
TRL's ``reward``, ``rewards/<scorer>/mean`` and the rest.

With ``rollout.environment`` each sample is a multi-turn episode, played through TRL's ``rollout_func`` by
:mod:`trl_plus.trainers.episodes`; the per-token turn ids ride with the rows into the micro-batches
(``output["turn_ids"]``). A method that trains a second module beside the policy gets a LoRA adapter with its own
optimiser from :meth:`PlusGRPOTrainer.add_trainable_adapter` (in its ``attach`` hook), checkpointed with the run.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from trl import GRPOConfig, GRPOTrainer

from ..builtin.group import GroupContext, GroupMethod
from ..contract import Rollout, Rollouts, Scorer, check_decoding
from ..errors import TrlPlusError
from . import resolve_method
from .guard import GuardMixin
from .metrics import gathered_mean

#: ``rollout.decoding`` keys with a ``GRPOConfig`` field of their own (the rest go to ``generation_kwargs``).
DECODING_FIELDS = {"max_new_tokens": "max_completion_length", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}  # fmt: skip
#: ``GRPOConfig`` fields the method, its rollout or the recipe's scorers own.
OWNED_GROUP_KEYS = {"num_generations": "rollout.n", "reward_weights": "rollout.scorers[].weight",
                    "beta": "method_args.beta", **{v: f"rollout.decoding.{k}" for k, v in DECODING_FIELDS.items()},
                    "generation_kwargs": "rollout.decoding"}  # fmt: skip


def grpo_args(args: GRPOConfig, rollout: Rollout, scorers: Sequence[tuple[Scorer, float]], beta: float) -> None:
    """Write the rollout, the scorers' weights and ``beta`` into ``args`` (in place), checking the batch arithmetic
    TRL would otherwise get wrong (a generation batch that splits a group) in one line."""
    check_decoding(rollout.decoding)
    if rollout.sources != ("policy",):
        raise TrlPlusError(f"rollout.sources: a group method samples the policy only, got {list(rollout.sources)}")
    if rollout.n < 2:
        raise TrlPlusError(f"rollout.n: a group needs at least 2 completions per prompt, got {rollout.n}")
    if args.auto_find_batch_size:
        raise TrlPlusError("training.auto_find_batch_size: it would change the batch mid-run and split groups; set "
                           "per_device_train_batch_size yourself")  # fmt: skip
    args.num_generations = rollout.n
    extra = {}
    for key, value in rollout.decoding.items():
        if key in DECODING_FIELDS:
            setattr(args, DECODING_FIELDS[key], value)
        elif key != "do_sample":
            extra[key] = value
    args.generation_kwargs = {**(args.generation_kwargs or {}), **extra} or None
    args.reward_weights = [w for scorer, weight in scorers for w in scorer.output_weights(weight)]
    args.beta = float(beta)
    check_group_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
                      args.generation_batch_size, args.steps_per_generation, rollout.n)  # fmt: skip


def check_group_batch(per_device: int, accumulation: int, processes: int, generation_batch_size: int | None,
                      steps_per_generation: int | None, n: int) -> None:  # fmt: skip
    """A one-line error when a generation batch would not hold whole groups of ``n`` completions."""
    if generation_batch_size is not None and generation_batch_size % n:
        raise TrlPlusError(f"training.generation_batch_size: {generation_batch_size} completions is not a multiple of "
                           f"rollout.n = {n} (a group would split)")  # fmt: skip
    generation = per_device * (steps_per_generation or accumulation) * processes
    if generation_batch_size is None and generation % n:
        raise TrlPlusError(
            f"training.per_device_train_batch_size: {per_device} × {'steps_per_generation' if steps_per_generation else 'gradient_accumulation_steps'} "
            f"{steps_per_generation or accumulation} × {processes} process(es) = {generation} completions per generation "
            f"batch, not a multiple of rollout.n = {n}: it counts completions, not prompts"
        )


@contextlib.contextmanager
def _reference_from(model: Any):
    """Inside: TRL's GRPO builds its reference from ``model`` instead of reloading one from the hub path."""
    import trl.trainer.grpo_trainer as grpo

    original = grpo.create_model_from_path
    grpo.create_model_from_path = lambda *args, **kwargs: model
    try:
        yield
    finally:
        grpo.create_model_from_path = original


class PlusGRPOTrainer(GuardMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` driven by a :class:`~trl_plus.GroupMethod` (see the module docstring).

    ``method`` is a registry name, a ``GroupMethod`` class or instance (``method_args`` fill its ``Config``);
    ``scorers`` the ``(Scorer, weight)`` pairs of the rewards; ``rollout`` replaces the method's ``Rollout`` (the
    recipe's ``rollout:`` block); ``ref_model`` the reference for ``beta > 0`` (default: a frozen copy of ``model``;
    with LoRA the adapter off); ``nan`` the NaN policy and atomic checkpoints of every trl-plus trainer
    (:class:`~trl_plus.trainers.guard.GuardMixin`). Everything else is ``GRPOTrainer``'s."""

    def __init__(self, model: Any, *, method: Any, method_args: dict[str, Any] | None = None,
                 scorers: Sequence[tuple[Scorer, float]] = (), rollout: Rollout | None = None,
                 args: GRPOConfig | None = None, ref_model: Any = None, processing_class: Any = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self.method = resolve_method(method, method_args)
        if not isinstance(self.method, GroupMethod):
            raise TrlPlusError(f"method {self.method.name!r} runs on a {self.method.trainer!r} trainer, not on "
                               "PlusGRPOTrainer")  # fmt: skip
        if not scorers:
            raise TrlPlusError(f"method {self.method.name!r} learns from rewards: give rollout.scorers, e.g. "
                               "[{name: digits}] (trl-plus list --scorers)")  # fmt: skip
        self.rollout = rollout or self.method.needs.rollout
        self.scorers = tuple(scorers)
        args = args or GRPOConfig(f"runs/{self.method.name}")
        beta = float(getattr(self.method.config, "beta", 0.0))
        grpo_args(args, self.rollout, self.scorers, beta)
        self.method.grpo_config(args)  # the method's own GRPOConfig settings (default: none)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        for scorer, _ in self.scorers:
            scorer.tokenizer = scorer.tokenizer or tokenizer
        reward_funcs = [fn for scorer, _ in self.scorers for fn in scorer.reward_funcs()]
        self._gathered_scores: torch.Tensor | None = None
        self._generation_step = 0  # micro-steps since the last generation
        self._episode_rows: list[dict[str, Any]] = []  # the generation batch's rows, for the environment's reset
        if self.rollout.environment is not None:
            if kwargs.get("rollout_func") is not None:
                raise TrlPlusError("rollout.environment plays the episodes through TRL's rollout_func: pass one of "
                                   "them, not both")  # fmt: skip
            kwargs["rollout_func"] = self._play_episodes
        with contextlib.ExitStack() as stack:
            if beta > 0 and not is_peft_model(model) and kwargs.get("peft_config") is None:
                reference = ref_model if ref_model is not None else copy.deepcopy(model)
                stack.enter_context(_reference_from(reference.eval().requires_grad_(False)))
            # trl-plus owns its use of TRL's experimental rollout_func (episodes.py, pinned by tests): no warning
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
            super().__init__(model, reward_funcs=reward_funcs, args=args, processing_class=processing_class,
                             **kwargs)  # fmt: skip
        self._tag_names = [*getattr(self, "_tag_names", []), "trl-plus", self.method.name]
        for scorer, _ in self.scorers:
            scorer.device = scorer.device or self.accelerator.device
        self.trainable_adapters: dict[str, Any] = {}
        self.method.attach(self)

    def add_trainable_adapter(self, name: str, *, lr: float, **kwargs: Any):
        """A :class:`~trl_plus.trainers.adapters.TrainableAdapter` ``name`` on the policy's base (a copy of its
        adapter, with its own optimiser at ``lr``), saved in each checkpoint and restored on resume. The policy must
        be a LoRA model (``model.lora`` in a recipe, ``peft_config`` here)."""
        from .adapters import TrainableAdapter

        if not is_peft_model(self.model):
            raise TrlPlusError(f"method {self.method.name!r} trains a second adapter ({name!r}) on the policy's base: "
                               "the policy needs LoRA (model.lora in the recipe)")  # fmt: skip
        if name in self.trainable_adapters or name in self.model.peft_config:
            raise TrlPlusError(f"method {self.method.name!r}: the policy already has an adapter {name!r}")
        adapter = TrainableAdapter(self.model, name, lr=lr, source=self.model.active_adapter, **kwargs)
        self.trainable_adapters[name] = adapter
        return adapter

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            for adapter in self.trainable_adapters.values():
                adapter.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for adapter in self.trainable_adapters.values():
            adapter.load(resume_from_checkpoint)

    # -- rewards and advantages ------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        try:
            self._gathered_scores = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        except ValueError as exc:  # TRL's wrong-count message names the reward function (= our scorer/output)
            raise TrlPlusError(f"rollout.scorers: {str(exc).splitlines()[0]}") from None
        return self._gathered_scores

    def _play_episodes(self, prompts: list, trainer: Any) -> dict[str, Any]:
        """TRL's ``rollout_func``: one episode of the rollout's environment per prompt (``trainer`` is ``self``)."""
        from .episodes import play

        return play(self, self.rollout.environment, prompts, self._episode_rows)

    def _generate_and_score_completions(self, inputs):
        self._episode_rows = inputs
        output = super()._generate_and_score_completions(inputs)
        if self.rollout.environment is not None:  # per-token turns travel with the rows into the micro-batches
            width = output["completion_ids"].size(1)
            turns = torch.full((len(inputs), width), -1, dtype=torch.long)
            for i, row in enumerate(inputs):
                ids = row["turn_ids"][:width]
                turns[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            output["turn_ids"] = turns.to(output["completion_ids"].device)
        mode = "train" if self.model.training else "eval"
        scores = self._gathered_scores.double().cpu()
        weights = torch.tensor(self.reward_weights.tolist(), dtype=torch.float64)
        self._metrics[mode]["rollout/reward"].append((scores * weights).nansum(-1).mean().item())
        if self.method.wants_old_logps and "old_per_token_logps" not in output:
            output["old_per_token_logps"] = self._old_logps(output)
        if type(self.method).advantages is not GroupMethod.advantages:
            output["advantages"] = self._method_advantages(inputs, output, scores, weights)
        self._generation_step = 0
        return output

    def _old_logps(self, output) -> torch.Tensor:
        """The sampling policy's per-token log-probs of the generation batch (no grad), as TRL computes them."""
        prompt_completion = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, prompt_completion, attention, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size)  # fmt: skip
        return logps

    def _method_advantages(self, inputs, output, scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The method's advantages for this process's rows, from the gathered generation batch."""
        rollouts = self.gathered_rollouts(inputs, output, scores, weights)
        n_local = output["completion_ids"].size(0)
        baseline = self.accelerator.gather(output["advantages"]).double().cpu()
        value = self.method.advantages(rollouts, baseline)
        if value is None:
            return output["advantages"]
        value = torch.as_tensor(value)
        total = len(rollouts.completion_ids)
        if value.dim() not in (1, 2) or value.size(0) != total:
            raise TrlPlusError(f"method {self.method.name!r}: advantages() returned shape {tuple(value.shape)} for "
                               f"{total} rollouts; expected ({total},) or ({total}, T)")  # fmt: skip
        start = self.accelerator.process_index * n_local
        local = value[start : start + n_local]
        if local.dim() == 2:  # [N, T_max] over every process: this process's completions are T_local wide
            width = output["completion_ids"].size(1)
            local = torch.nn.functional.pad(local, (0, max(0, width - local.size(1))))[:, :width]
        return local.to(output["advantages"].device, torch.float32)

    def gathered_rollouts(self, inputs, output, scores: torch.Tensor, weights: torch.Tensor) -> Rollouts:
        """The generation batch of every process as one :class:`~trl_plus.Rollouts` (group-major: the ``n``
        completions of a prompt are consecutive rows, as TRL's ``RepeatSampler`` orders them)."""
        mask = output["completion_mask"].bool().cpu()
        ids = [row[m].tolist() for row, m in zip(output["completion_ids"].cpu(), mask, strict=True)]
        prompt_ids = [row[m].tolist() for row, m in zip(output["prompt_ids"].cpu(),
                                                          output["prompt_mask"].bool().cpu(), strict=True)]  # fmt: skip
        prompts = [x["prompt"] for x in inputs]
        texts = self.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids", "prompt_ids", "turn_ids")]
        local = {"ids": ids, "prompt_ids": prompt_ids, "prompts": prompts, "texts": texts,
                 "columns": {k: [x[k] for x in inputs] for k in keys}}  # fmt: skip
        if self.accelerator.num_processes > 1:
            parts = gather_object([local])
            merged = {k: [v for p in parts for v in p[k]] for k in ("ids", "prompt_ids", "prompts", "texts")}
            merged["columns"] = {k: [v for p in parts for v in p["columns"][k]] for k in keys}
            local = merged
        eos_ids = {self.processing_class.eos_token_id, *self._eos_token_ids()}
        old = output.get("old_per_token_logps")
        if old is not None:
            old = self.accelerator.gather(self.accelerator.pad_across_processes(old, dim=1)).double().cpu()
        turns = output.get("turn_ids")
        if turns is not None:
            turns = self.accelerator.pad_across_processes(turns, dim=1, pad_index=-1)
            turns = self.accelerator.gather(turns).cpu()
        n = self.num_generations if self.model.training else self.num_generations_eval
        return Rollouts(
            prompt_ids=local["prompt_ids"], completion_ids=local["ids"], prompts=local["prompts"],
            completions=local["texts"], group=torch.arange(len(local["ids"])) // n,
            source=["policy"] * len(local["ids"]), scores=scores, weights=weights,
            eos=torch.tensor([bool(c) and c[-1] in eos_ids for c in local["ids"]]),
            lengths=torch.tensor([len(c) for c in local["ids"]], dtype=torch.float64),
            columns=local["columns"], score_names=tuple(self.reward_func_names), old_token_logps=old,
            turn_ids=turns,
        )  # fmt: skip

    def _eos_token_ids(self) -> list[int]:
        ids = getattr(self.generation_config, "eos_token_id", None)
        return list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []

    # -- the loss --------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if type(self.method).loss is GroupMethod.loss:
            loss = super()._compute_loss(model, inputs)
        else:
            loss = self._method_loss(model, inputs)
        self._generation_step += 1
        return loss

    def _method_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        token_logps, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention,
                                                                     completion_ids.size(1))  # fmt: skip
        mask = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        accumulation = self.current_gradient_accumulation_steps
        known = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch",
                 "old_per_token_logps", "ref_per_token_logps", "turn_ids", "tool_mask"}  # fmt: skip
        ctx = GroupContext(
            token_logps=token_logps, old_token_logps=token_logps.detach() if old is None else old, mask=mask,
            advantages=inputs["advantages"], config=self.method.config,
            rows_per_update=completion_ids.size(0) * accumulation,
            step_in_generation=self._generation_step // accumulation,
            ref_token_logps=inputs.get("ref_per_token_logps"), turn_ids=inputs.get("turn_ids"),
            batch={k: v for k, v in inputs.items() if k not in known},
        )  # fmt: skip
        result = self.method.loss(ctx)
        if result is None:
            raise TrlPlusError(f"method {self.method.name!r}: loss() returned None for some batches only; return a "
                               "LossOutput always, or do not override loss()")  # fmt: skip
        for key, value in result.metrics.items():
            self.log_metric(key, value)
        return result.loss

    def log_metric(self, name: str, value: Any) -> None:
        """Log ``value`` (a number or 0-d tensor) as ``name`` with the next logged step, averaged over processes (so
        every process calls it: a method's :meth:`~trl_plus.GroupMethod.advantages` or :meth:`loss`) and over the
        calls since the last log — as ``PlusTrainer.log_metric``."""
        self._metrics["train" if self.model.training else "eval"][name].append(gathered_mean(self.accelerator, value))
