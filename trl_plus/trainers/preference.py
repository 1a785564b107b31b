"""PlusTrainer: TRL's DPOTrainer with the loss, collator and frozen-model hooks supplied by a method plugin.

One step: the method's collator builds ``[K*B, L]`` sequences; one policy forward (TRL's fused LM head: per-token
log-probs without materialising the logits); the reference (adapter off, a frozen model, or precomputed columns)
and the teacher only when the method needs them; then ``method.loss(LossContext)``; TRL's usual metrics plus the
method's own are logged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import (
    get_config_model_id,
    selective_log_softmax,
)

from ..contract import FrozenOutputs, LossContext, Method
from ..data.collate import (
    SEQ_MASK,
    SEQUENCE_SLOTS,
    TOKEN_PAD,
    TRUNCATED,
    FieldCollation,
    PromptCollator,
    method_collator,
)
from ..data.lengths import dropped_message, rows_of, truncation_report
from ..data.load import (
    check_columns,
    check_lists,
    check_text_columns,
    few_rows,
    is_prepared,
    prepare_rows,
    quiet_progress,
)
from ..data.sharing import SHARED, SharedBatch, share_prefixes, uses_flex_attention
from ..errors import TrlPlusError
from ..models.load import bf16_available, resolve_model_path
from . import resolve_method
from .adapters import (
    REFERENCE_ADAPTER,
    active_adapter,
    add_trainable_adapters,
    copy_adapter,
    load_adapters,
    reference_off,
    trained_module,
)
from .evaluation import MetricsMixin
from .frozen import REF_COLUMN, resolve_reference_mode
from .guard import GuardMixin
from .heads import capture_hidden, checkpointing_off, label_logps
from .metrics import append_pair_metrics, gathered_mean
from .rollout import RolloutMixin
from .sources import FrozenSourcesMixin, needs_hidden

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids",
    "pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes",
)  # fmt: skip


def paper_for_card(method: Method) -> dict[str, str | None]:
    """The method's paper as TRL's model card takes it (``DPOTrainer._paper``'s keys): title, arXiv id and a BibTeX
    entry (TRL's own when the paper is DPO's, else an arXiv ``@misc``)."""
    paper = getattr(method, "paper", None)
    if paper is None:
        return {}
    if paper.arxiv == DPOTrainer._paper["id"]:
        return {**DPOTrainer._paper, "title": paper.title}
    if not paper.arxiv:
        key = "".join(ch for ch in paper.title.split(":")[0].lower() if ch.isalnum())[:24]
        citation = (f"@misc{{{key},\n    title         = {{{{{paper.title}}}}},\n"
                    f"    howpublished  = {{{paper.venue or ''}}},\n    url           = {{{paper.url or ''}}},\n}}")
        return {"title": paper.title, "id": None, "citation": citation}
    citation = (f"@misc{{arxiv{paper.arxiv},\n    title         = {{{{{paper.title}}}}},\n"
                f"    eprint        = {{{paper.arxiv}}},\n    archivePrefix = {{arXiv}},\n"
                f"    url           = {{https://arxiv.org/abs/{paper.arxiv}}},\n}}")  # fmt: skip
    return {"title": paper.title, "id": paper.arxiv, "citation": citation}


def method_section(method: Method) -> str:
    """The model card's "Method" section: the method's name and summary, its paper (arXiv link) and official code."""
    lines = ["## Method", "", f"Trained with the trl-plus method **`{method.name}`**"
             + (f": {method.summary.rstrip('.')}." if method.summary else ".")]  # fmt: skip
    paper = getattr(method, "paper", None)
    if paper is not None:
        lines += ["", f"- Paper: [{paper.title}]({paper.link}) ({paper.where})" if paper.link else
                  f"- Paper: {paper.title} ({paper.where})"]  # fmt: skip
        if paper.code:
            url = paper.code if "://" in paper.code else f"https://github.com/{paper.code}"
            lines.append(f"- Official code: [{paper.code}]({url})")
    return "\n".join(lines) + "\n"


class PlusTrainer(GuardMixin, RolloutMixin, MetricsMixin, FrozenSourcesMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` driven by a method plugin.

    Build it exactly like ``DPOTrainer`` plus ``method`` (a registered name, a :class:`~trl_plus.Method` class or
    instance), ``method_args``, ``reference_mode`` (``auto``, ``model``, ``adapter``, ``precomputed``, ``none``) and,
    for methods that need one, ``teacher_model``. ``model`` may also be a model alias (``tiny-llama``). ``args`` is a
    ``trl.DPOConfig`` (``None``: its defaults in ``runs/<method>``, bf16 and pinned memory only on a GPU); its loss
    fields (``loss_type``, ``beta``, ``ld_alpha``, ...) are ignored: the method owns the loss. ``base_model`` is how
    the model card names the base model (default: ``model`` itself when it is a name, else its ``name_or_path``).
    ``nan`` (``"stop"``, default, or ``"skip"``): what a non-finite loss or gradient norm does, and checkpoints are
    written atomically (:class:`~trl_plus.trainers.guard.GuardMixin`).

    ``peft_config`` may also map names to LoRA configs: several trainable adapters (``model.adapters``), each in its
    own optimiser parameter group at ``learning_rate × adapter_lr_scales[name]`` (default 1), all saved (one folder
    each) and resumed together; the reference is then the base with every adapter off.
    """

    _tag_names = ["trl", "trl-plus"]
    _name = "PlusTrainer"

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        *,
        method: str | Method | type[Method] = "dpo",
        method_args: Mapping[str, Any] | None = None,
        reference_mode: str = "auto",
        teacher_model=None,
        teachers: Mapping[str, Any] | None = None,
        reference_identity: str | None = None,
        data_collator=None,
        processing_class=None,
        peft_config=None,
        base_model: str | None = None,
        prefix_sharing: bool = False,
        packing: bool = False,
        adapter_lr_scales: Mapping[str, float] | None = None,
        scorers: Sequence[tuple[Any, float]] = (),
        rollout: Any = None,
        **kwargs,
    ):
        self.method = resolve_method(method, method_args)
        if packing and not prefix_sharing:
            raise TrlPlusError("training.packing packs prefix-shared blocks: set training.prefix_sharing: true too")
        if self.method.trainer != "preference":
            raise TrlPlusError(
                f"method {self.method.name!r} runs on a {self.method.trainer!r} trainer, not on PlusTrainer"
            )
        if args is None:  # TRL's defaults, less those that fail or warn on a CPU; checkpointing (TRL: on) under
            # transformers' current name (DPOConfig's own default is the deprecated alias)
            args = DPOConfig(f"runs/{self.method.name}", bf16=bf16_available(),
                             dataloader_pin_memory=torch.cuda.is_available(),
                             activation_checkpointing=DPOConfig.gradient_checkpointing)  # fmt: skip
        # the model card's and the model's tags, trainer name and paper are the method's (TRL's are DPO's)
        self._tag_names = [*PlusTrainer._tag_names, self.method.name]
        self._name = self.method.name
        self._paper = paper_for_card(self.method)
        self.base_model_name = base_model or (model if isinstance(model, str) else get_config_model_id(model.config))
        if isinstance(model, str):
            model = resolve_model_path(model)  # an alias becomes its directory
        if isinstance(model, str) and processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model)
        elif processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        will_be_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        spec = rollout or self.method.needs.rollout
        per_iteration = spec is not None and spec.when == "iteration"
        #: rows built per iteration by the driver (trl_plus.trainers.iterations), which precomputes their reference
        self.rows_per_iteration = per_iteration
        self.reference_mode = resolve_reference_mode(
            self.method, reference_mode, will_be_peft, has_ref_model=ref_model is not None, iterated=per_iteration
        )
        if self.reference_mode == "none" and ref_model is not None:
            raise TrlPlusError(f"method {self.method.name!r} runs without a reference; do not pass ref_model")
        if self.reference_mode == "model" and ref_model is None and not isinstance(model, str):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the initial policy, frozen
        model, peft_config = self._prepare_policy(model, peft_config, adapter_lr_scales, args)
        if uses_flex_attention(model) and (args.use_cpu or not torch.cuda.is_available()):
            raise TrlPlusError("model.attn_implementation: flex_attention trains on a GPU only (torch has no "
                               "FlexAttention backward on a CPU); on a CPU keep the default (sdpa)")  # fmt: skip
        self._check_teachers(teachers, teacher_model, will_be_peft)
        self.reference_identity = reference_identity
        # full logits or hidden states are the plain rows' (a method or a live teacher that reads them keeps the
        # plain path)
        needs = self.method.needs
        needs_plain = needs.logits or needs.hidden_states or needs.scored_logits or (
            type(self.method).policy_forward is not Method.policy_forward) or any(
            needs_hidden(self.teacher_kinds[name]) for name, t in self.teachers.items() if t.mode == "live")
        self.prefix_sharing, self.packing = prefix_sharing and not needs_plain, packing and not needs_plain
        self._shared = (None, None)

        self.method.tokenizer = tokenizer  # for collators that need vocabulary facts (special ids, vocab size)
        if data_collator is None:
            data_collator = method_collator(self.method, tokenizer.pad_token_id, args.max_length, args.truncation_mode)
        elif not isinstance(data_collator, FieldCollation):
            data_collator = FieldCollation(data_collator, self.method.needs)
        self.method_collator = data_collator
        if needs.rollout is not None:  # online: the loader hands over prompts; the rollout stage builds the rows
            self.prefix_sharing = self.packing = False
            rollout_spec = rollout or needs.rollout
            columns = [c for s, _ in scorers for c in s.columns]
            columns += [src[len("column:"):] for src in rollout_spec.sources if src.startswith("column:")]
            self._prompt_columns = tuple(dict.fromkeys(["prompt", *columns]))
            if rollout_spec.when == "step":  # ("iteration": the driver samples, the loader hands over rows)
                data_collator = PromptCollator(self._prompt_columns)
        if self.prefix_sharing:
            data_collator.share = (tokenizer.pad_token_id, self.method.sequences_per_example or 1, self.packing)

        # DPOTrainer loads a second full model as reference unless the policy is a PEFT model or the reference is
        # precomputed. A reference-free run must never cost one: it takes the "precomputed" path during
        # construction (our _precompute_ref_logps then does nothing); the flag is set to its real value after.
        args.precompute_ref_log_probs = self.reference_mode == "precomputed" or (
            self.reference_mode == "none" and not will_be_peft
        )
        super().__init__(
            model, ref_model=ref_model, args=args, data_collator=data_collator,
            processing_class=processing_class, peft_config=peft_config, **kwargs,
        )  # fmt: skip
        self.precompute_ref_logps = args.precompute_ref_log_probs = self.reference_mode == "precomputed"
        if self.precompute_ref_logps and not self.rows_per_iteration:
            self.ref_model = None  # its log-probs are in the dataset now: free the weights
        self.ld_alpha = None  # TRL's loss options are unused: the method owns the loss
        self.beta = getattr(self.method.config, "beta", None)
        if self.named_adapters:  # TRL added a "ref" adapter (a fresh one, named after "default"): not the reference
            policy = self.accelerator.unwrap_model(self.model)
            del policy.peft_config["default"]
            if REFERENCE_ADAPTER in policy.peft_config:
                policy.delete_adapter(REFERENCE_ADAPTER)
            for name, parameter in policy.named_parameters():
                parameter.requires_grad_(any(f".{adapter}." in name for adapter in self.trained_adapters))

        self._attach_teachers()
        if needs.rollout is not None:
            self.set_rollout(scorers, rollout)
        else:
            if scorers or rollout is not None:
                raise TrlPlusError(f"method {self.method.name!r} trains on its data, it samples nothing: scorers and "
                                   "rollout are for online methods (Needs.rollout)")  # fmt: skip
            self._report_truncation()

    def _prepare_policy(self, model, peft_config, lr_scales, args):
        """The policy before TRL sees it: the method's :meth:`~trl_plus.Method.prepare_model` (extra modules, its
        ``trainable_modules`` added to LoRA's ``modules_to_save``), and several named trainable adapters wrapped
        here (TRL wraps one). Returns ``(model, peft_config left for TRL)``."""
        method = self.method
        named = self.named_adapters = isinstance(peft_config, Mapping)
        prepares = type(method).prepare_model is not Method.prepare_model
        self.trained_adapters = list(peft_config) if named else (["default"] if peft_config is not None else [])
        self.adapter_lr_scales = dict(lr_scales or {})
        for name, scale in self.adapter_lr_scales.items():
            if not scale > 0:
                raise TrlPlusError(f"model.adapters.{name}.lr_scale: must be > 0, got {scale}")
        missing = [name for name in method.needs.policy_adapters if name not in self.trained_adapters]
        if missing:
            raise TrlPlusError(f"model.adapters: method {method.name!r} trains the adapters "
                               f"{', '.join(method.needs.policy_adapters)}; the policy has "
                               f"{', '.join(self.trained_adapters) or 'none'} (missing {', '.join(missing)})")
        if not (prepares or named):
            return model, peft_config
        if isinstance(model, str):
            from trl.trainer.utils import create_model_from_path

            model = create_model_from_path(model, **dict(args.model_init_kwargs or {}))
        if prepares:
            model = method.prepare_model(model) or model
        configs = dict(peft_config) if named else ({"default": peft_config} if peft_config is not None else {})
        configs = {name: copy.deepcopy(config) for name, config in configs.items()}
        for config in configs.values():
            if method.trainable_modules:
                config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []),
                                                             *method.trainable_modules]))  # fmt: skip
        if not named:
            return model, configs.get("default")
        model = add_trainable_adapters(model, configs)
        model.peft_config["default"] = configs[self.trained_adapters[0]]  # TRL reads it (and copies it into "ref")
        return model, None

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card for the method: its name in the tags, its own paper credited (TRL credits DPO's), a
        "Method" section (name, summary, paper, official code), and what TRL leaves as ``None`` filled in: the base
        model (TRL names only a hub id, not a local folder such as an alias, a converted GGUF file or a checkpoint)
        and the quick start's ``model=`` (the output directory, for a run not pushed to the hub)."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        card = Path(self.args.output_dir) / "README.md"
        if not self.is_world_process_zero() or not card.is_file():
            return
        base = f"`{self.base_model_name}`" if self.base_model_name else "a model without a name"
        text = card.read_text().replace("[None](https://huggingface.co/None)", base)
        text = text.replace('model="None"', f'model="{self.args.output_dir}"')
        card.write_text(text.replace("\n## Quick start", f"\n{method_section(self.method)}\n## Quick start", 1))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's save; the final model saved in ``args.output_dir`` gets the model card too (written first, so that
        PEFT's save adds its adapter metadata to it)."""
        if not _internal_call and output_dir in (None, self.args.output_dir):
            hub_id = self.args.hub_model_id
            self.create_model_card(model_name=hub_id.split("/")[-1] if hub_id else Path(self.args.output_dir).name)
        super().save_model(output_dir, _internal_call)

    # -- data -----------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(self.method.tokenized_columns) <= set(dataset.column_names):
            return dataset  # already tokenized
        where = f"{dataset_name} dataset"
        if not is_prepared(dataset, self.method):
            check_columns(dataset.column_names, self.method, where)
            check_text_columns(dataset.features, self.method, where)
            check_lists(dataset, self.method, where)
            dataset = prepare_rows(dataset, self.method, dataset_name, where)
        # datasets draws a bar per map (TRL: three per split): only for data large enough to wait for
        with quiet_progress(args.disable_tqdm or few_rows(dataset)):
            if self.method.tokenize is None:  # TRL's tokenization: drops examples whose prompt fills max_length
                prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                if isinstance(dataset, Dataset) and len(prepared) < len(dataset):
                    message = dropped_message(len(dataset) - len(prepared), len(dataset), args.max_length,
                                              f"{dataset_name} dataset")  # fmt: skip
                    if len(prepared) == 0:
                        raise TrlPlusError(message)
                    logger.warning(message)
                return prepared
            map_kwargs = {"desc": f"Tokenizing {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}
            return dataset.map(self.method.tokenize, fn_kwargs={"tokenizer": self._tokenizer}, **map_kwargs)

    def _report_truncation(self) -> None:
        """Say once, per dataset, what ``max_length`` cuts from its sequences (counts per side, prompt and completion
        tokens lost); each step then logs the fraction of its sequences that were cut as ``truncated``."""
        if not self.accelerator.is_main_process:
            return
        eval_sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        for name, dataset in {"train": self.train_dataset, **eval_sets}.items():
            if not isinstance(dataset, Dataset):
                continue
            rows = rows_of(dataset, self.method.tokenized_columns)
            report = truncation_report(self.method_collator, rows, self.args.max_length, self.args.truncation_mode)
            if report is not None and report.any:
                logger.warning(report.summary(f"{name} dataset"))

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            needs = self.method.needs
            lists = (spec.name for spec in needs.lists)
            columns = (*self.method.tokenized_columns, *needs.fields, *needs.optional_fields, *lists, REF_COLUMN,
                       *getattr(self, "_teacher_columns", ()), *getattr(self, "_prompt_columns", ()))
            self._signature_columns = list(dict.fromkeys(columns))

    # -- frozen models --------------------------------------------------------------------------------------
    @staticmethod
    def _model_kwargs(inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}

    def shared_layout(self, inputs: Mapping[str, Any]):
        """The batch in the prefix-shared layout (:mod:`trl_plus.trainers.sharing`), built once per batch and reused by
        the policy, the reference and the teacher; ``None`` on the plain path."""
        if not self.prefix_sharing:
            return None
        ids, shared = self._shared
        if ids is not inputs["input_ids"]:
            if SHARED in inputs:  # built by the collator, in the data loader
                shared = SharedBatch.from_tensors(inputs[SHARED])
            else:  # a batch collated elsewhere: build it here (a device -> host copy)
                plain = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
                shared = share_prefixes(plain, self._tokenizer.pad_token_id, self.num_sequences(inputs),
                                        pack=self.packing)  # fmt: skip
                device = inputs["input_ids"].device
                shared = SharedBatch.from_tensors({k: v.to(device) for k, v in shared.tensors().items()})
            self._shared = (inputs["input_ids"], shared)
        return shared

    def fused_token_logps(self, model, inputs: Mapping[str, Any], **kwargs) -> tuple[torch.Tensor, Any]:
        """``([N, T] per-token log-probs, outputs)`` of ``model`` on the batch through TRL's fused LM head (no
        ``[N, L, V]`` logits), on the plain rows or, with ``prefix_sharing``, on the shared layout mapped back to the
        plain one (``outputs``' per-token fields too)."""
        seq_len = inputs["completion_mask"].size(1) - 1
        shared = self.shared_layout(inputs)
        if shared is None:
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            outputs = model(**self._model_kwargs(inputs), **kwargs, labels=labels, use_cache=False, fused_lm_head=True)
            return outputs.log_probs[:, -seq_len:], outputs
        outputs = model(**shared.model_inputs(flex=uses_flex_attention(model)), **kwargs, use_cache=False,
                        fused_lm_head=True)  # fmt: skip
        for name in ("log_probs", "entropy", "mean_logits", "is_top1"):
            if getattr(outputs, name, None) is not None:
                setattr(outputs, name, shared.gather(getattr(outputs, name)))
        return outputs.log_probs, outputs

    def frozen_token_logps(self, model, inputs: Mapping[str, Any], adapter_off: bool = False) -> torch.Tensor:
        """``[K*B, T]`` per-token log-probs of a frozen ``model`` (no grad); ``adapter_off`` disables the policy's
        PEFT adapter (the reference of a LoRA/QLoRA run: no second copy of the base weights)."""
        adapter_context = contextlib.nullcontext()
        if adapter_off:  # a refreshed reference is the frozen "ref" adapter; else the base, adapter(s) disabled
            adapter_context = reference_off(self.accelerator.unwrap_model(self.model), self.named_adapters)
        with (
            torch.no_grad(),
            checkpointing_off(self.model, self.args.activation_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            return self.fused_token_logps(model, inputs)[0]

    def forward_logits(self, model, inputs: Mapping[str, Any], **kwargs) -> Any:
        """Run ``model`` on the batch and return its full outputs (logits, and hidden states if asked)."""
        return model(**self._model_kwargs(inputs), use_cache=False, **kwargs)

    def reference_token_logps(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The reference hook: the method's override, precomputed columns, the adapter off, or the frozen model."""
        custom = self.method.reference(self, inputs)
        if custom is not None:
            return custom
        if REF_COLUMN in inputs:
            return inputs[REF_COLUMN]
        if self.ref_model is None:
            return self.frozen_token_logps(self.model, inputs, adapter_off=is_peft_model(self.model))
        return self.frozen_token_logps(self.ref_model, inputs)

    @property
    def teacher_model(self) -> Any:
        """The live model of the teacher named ``teacher`` (``Needs(teacher=True)``), if any."""
        return self.teacher_models.get("teacher")

    def teacher_outputs(self, inputs: Mapping[str, Any]) -> Any:
        """The teacher hook: the method's override, else the teacher's ``[K, B, T]`` per-token log-probs (a model, an
        adapter or precomputed columns)."""
        custom = self.method.teacher(self, inputs)
        if custom is not None:
            return custom
        return self.frozen_outputs("teacher", inputs).logps

    def num_sequences(self, inputs: Mapping[str, Any]) -> int:
        """``K`` of this batch: the collator's ``seq_mask`` rows (variable K), else the method's constant."""
        if SEQ_MASK in inputs:
            return inputs[SEQ_MASK].size(0)
        if self.method.sequences_per_example is None:
            raise TrlPlusError(f"method {self.method.name!r} has a variable number of sequences per example, but its "
                               "collator emits no seq_mask: use trl_plus.SequencesCollator")  # fmt: skip
        return self.method.sequences_per_example

    def to_grid(self, inputs: Mapping[str, Any], rows: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``[N, T]`` per-row values -> ``[K, B, T]``: rows of a variable-K batch are placed at their
        ``sequence_slots`` (missing sequences get ``fill``; differentiable), others are viewed sequence-major."""
        num_sequences = self.num_sequences(inputs)
        slots = inputs.get(SEQUENCE_SLOTS)
        if slots is not None:
            size = inputs[SEQ_MASK].size(1)
            grid = rows.new_full((num_sequences * size, *rows.shape[1:]), fill)
            rows = grid.index_copy(0, slots, rows)
        return rows.view(num_sequences, -1, *rows.shape[1:])

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's hook for ``precompute_ref_log_probs``: the reference's columns from the column cache
        (:mod:`trl_plus.trainers.columns`), keyed by the data and the reference's identity, not by the run's
        arguments, so another ``output_dir``, learning rate or method reuses them."""
        if self.reference_mode != "precomputed" or self.rows_per_iteration:
            return dataset  # reference-free construction path (see __init__), or an iterated run's prompts
        return self._precompute_ref_logps_now(dataset, name)

    def reference_columns_for(self, dataset: Dataset, initial: bool) -> Dataset:
        """``dataset`` (an iteration's rows) with precomputed reference columns (``reference.mode: precomputed``):
        of the initial reference (``initial``: adapter off, or the reference model; cached like any precomputed
        reference), or of the policy as it is now, adapter on (the reference promoted at an iteration's start)."""
        if REF_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(REF_COLUMN)
        if initial:
            return self._precompute_ref_logps_now(dataset, "train")
        rows = self._frozen_columns(dataset, "train", "reference", {REF_COLUMN: "logps"},
                                    lambda batch: {"logps": self.frozen_token_logps(self.model, batch)})
        return dataset.add_column(REF_COLUMN, rows[REF_COLUMN])

    def _precompute_ref_logps_now(self, dataset: Dataset, name: str) -> Dataset:
        model = self.ref_model or self.model
        adapter_off = self.ref_model is None and is_peft_model(self.model)
        identity = self.reference_identity or f"weights:{self._precompute_model_hash}"
        return self._reference_columns(dataset, name, identity, model, adapter_off)

    def refresh_reference(self) -> None:
        """π_ref ← π_θ: the reference becomes a frozen copy of the current policy (a training stage's start).

        - ``model``: the frozen reference model loads the policy's weights;
        - ``adapter``: the trained adapter is copied into a frozen ``ref`` adapter, which the reference forward uses
          from then on (no second copy of the base weights);
        - ``precomputed``: the reference columns of ``train_dataset`` (and ``eval_dataset``) are recomputed with
          the current policy, adapter on.

        A hard copy, not TRL's ``sync_ref_model`` (soft mixing every N steps, refused with PEFT).
        """
        policy = self.accelerator.unwrap_model(self.model)
        if self.reference_mode == "none":
            raise TrlPlusError(f"method {self.method.name!r} is reference-free: there is no reference to refresh")
        if self.reference_mode == "model":
            if is_peft_model(policy):
                raise TrlPlusError("a reference refresh with LoRA uses reference.mode: adapter (or precomputed), not "
                                   "model")  # fmt: skip
            reference = self.accelerator.unwrap_model(self.ref_model)
            try:
                reference.load_state_dict(policy.state_dict())
            except RuntimeError as exc:
                raise TrlPlusError(f"the reference cannot take the policy's weights (another architecture: "
                                   f"reference.name_or_path?): {str(exc).splitlines()[0]}") from None  # fmt: skip
        elif self.reference_mode == "adapter":
            copy_adapter(policy, policy.active_adapter, REFERENCE_ADAPTER)
        else:
            for attribute, name in (("train_dataset", "train"), ("eval_dataset", "eval")):
                dataset = getattr(self, attribute)
                if isinstance(dataset, Dataset) and REF_COLUMN in dataset.column_names:
                    dataset = dataset.remove_columns(REF_COLUMN)
                    rows = self._frozen_columns(dataset, name, "reference", {REF_COLUMN: "logps"},
                                                lambda batch: {"logps": self.frozen_token_logps(self.model, batch)})
                    setattr(self, attribute, dataset.add_column(REF_COLUMN, rows[REF_COLUMN]))

    # -- the step -------------------------------------------------------------------------------------------
    def build_context(self, model, inputs: Mapping[str, Any], needs=None) -> LossContext:
        """The :class:`~trl_plus.LossContext` of one collated batch: the policy forward (``model``), the reference
        and the frozen sources that ``needs`` (default: the method's) asks for. The one context builder: the
        training step, evaluation during training and ``trl-plus eval``'s metrics all see a batch through it.
        ``ctx.outputs`` is the policy forward's outputs."""
        needs = self.method.needs if needs is None else needs
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        shift_mask = inputs["completion_mask"][:, 1:]
        adapters = needs.policy_adapters
        with self._adapter(adapters[0]) if adapters else contextlib.nullcontext():
            token_logps, outputs, head = self._policy_forward(model, inputs, needs, router)

        wants_reference = needs.reference != "no" and self.reference_mode != "none"
        ref = self.reference_token_logps(inputs) if wants_reference else None
        ref = None if ref is None else self.to_grid(inputs, ref.to(token_logps.dtype))
        frozen = {} if ref is None else {"reference": FrozenOutputs(logps=ref)}
        for name, kinds in needs.frozen_sources().items():
            if name == "reference":  # a metric reading more of the reference than its label log-probs
                model_, context = self.reference_source()
                rows = self.frozen_rows(model_, inputs, kinds, context)
                frozen[name] = self.outputs_on_grid(inputs, rows)
            else:
                frozen[name] = self.frozen_outputs(name, inputs, kinds)
        seq_mask = inputs.get(SEQ_MASK)
        ctx = LossContext(
            token_logps=self.to_grid(inputs, token_logps),
            mask=self.to_grid(inputs, shift_mask.to(token_logps.dtype)),
            ref_token_logps=ref,
            teacher=self.teacher_outputs(inputs) if needs.teacher else None,
            batch=inputs,
            outputs=outputs,
            step=self.state.global_step,
            epoch=self.state.epoch or 0.0,
            training=self.model.training,
            seq_mask=None if seq_mask is None else seq_mask.to(token_logps.dtype),
            tokens={name: self.to_grid(inputs, inputs[name][:, 1:], fill=TOKEN_PAD) for name in needs.token_fields},
            frozen=frozen,
            head=head,
            labels=self.to_grid(inputs, inputs["input_ids"][:, 1:], fill=TOKEN_PAD),
        )
        if adapters:
            ctx.adapters = functools.partial(self._adapter_context, model, inputs, needs, router)
        return ctx

    def _policy_forward(self, model, inputs: Mapping[str, Any], needs, router) -> tuple[torch.Tensor, Any, Any]:
        """``([N, T] per-token log-probs (zero off the scored tokens), outputs, head)`` of the policy: the method's
        :meth:`~trl_plus.Method.policy_forward`, else the full logits (``Needs.logits`` / ``hidden_states``), else
        TRL's fused head (recording the hidden states for ``Needs.scored_logits``)."""
        shift_mask = inputs["completion_mask"][:, 1:]
        custom = self.method.policy_forward(self, model, inputs)
        if custom is not None:
            return custom.token_logps * shift_mask, custom.outputs, None
        if needs.logits or needs.hidden_states:
            outputs = model(**self._model_kwargs(inputs), **router, use_cache=False,
                            output_hidden_states=needs.hidden_states)  # fmt: skip
            token_logps = selective_log_softmax(outputs.logits[:, -shift_mask.size(1) - 1 : -1],
                                                inputs["input_ids"][:, 1:])  # fmt: skip
            return token_logps * shift_mask, outputs, None
        if needs.scored_logits:  # the fused head, and the hidden states it ran on for ctx.logps_at / scored_logits
            (token_logps, outputs), head = self.policy_head(
                model, inputs, lambda: self.fused_token_logps(model, inputs, **router))
            return token_logps, outputs, head
        return (*self.fused_token_logps(model, inputs, **router), None)

    def _adapter(self, name: str):
        """The policy's trainable adapter ``name`` active inside the block (``requires_grad`` untouched)."""
        if name not in self.trained_adapters:
            raise TrlPlusError(f"method {self.method.name!r} reads an adapter named {name!r}; the policy trains "
                               f"{', '.join(self.trained_adapters) or 'none'}")  # fmt: skip
        return active_adapter(self.accelerator.unwrap_model(self.model), name)

    def _adapter_context(self, model, inputs, needs, router, ctx: LossContext, name: str) -> LossContext:
        """``ctx.for_adapter(name)``: the policy forward again under adapter ``name``; all else shared with ``ctx``."""
        if name == needs.policy_adapters[0]:
            return ctx
        with self._adapter(name):
            token_logps, outputs, head = self._policy_forward(model, inputs, needs, router)
        return dataclasses.replace(ctx, token_logps=self.to_grid(inputs, token_logps), outputs=outputs, head=head,
                                   adapters=None)  # fmt: skip

    def policy_hidden(self, model, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``[N, L - 1, H]`` the policy's final hidden states at the label positions (with grad), from one forward
        through ``model`` itself (DDP and the active adapter apply) that projects the LM head at one position only:
        for a :meth:`~trl_plus.Method.policy_forward` that applies heads of its own."""
        with capture_hidden(model) as seen:
            model(**self._model_kwargs(inputs), use_cache=False, logits_to_keep=1)
        return seen[-1][:, :-1]

    def head_logps(self, hidden: torch.Tensor, weight: torch.Tensor, inputs: Mapping[str, Any],
                   rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``[n, T]`` label log-probs of the batch's rows ``rows`` (default: all) under a linear head ``weight``
        ``[V, H]`` on their hidden states ``hidden`` ``[n, T, H]`` (from :meth:`policy_hidden`), at the scored
        tokens only, in checkpointed chunks (memory: one chunk of logits)."""
        labels, where = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
        if rows is not None:
            labels, where = labels[rows], where[rows]
        return label_logps(hidden, weight, labels, where)

    def policy_module(self, model, name: str) -> Any:
        """The module ``name`` that :meth:`~trl_plus.Method.prepare_model` added, as the active adapter trains it."""
        return trained_module(self.accelerator.unwrap_model(model), name)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        ctx = self.build_context(model, inputs)
        outputs = ctx.outputs
        result = self.method.loss(ctx)
        loss = result.loss
        if getattr(self, "empty_step", False) and self.model.training:
            loss = loss * 0.0  # stand-in rows (RolloutMixin._stand_in_rows): the step runs, nothing is learned
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self._gathered_mean(outputs.aux_loss))
        self._log_step_metrics(mode, ctx, result, outputs, inputs)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
        return (loss, outputs) if return_outputs else loss

    # -- metrics --------------------------------------------------------------------------------------------
    def _gathered_mean(self, value) -> float:
        return gathered_mean(self.accelerator, value)

    def _gathered_ratio(self, numerator, denominator) -> float:
        both = torch.stack([numerator.float().sum(), denominator.float().sum()]).detach()
        total = self.accelerator.gather_for_metrics(both.unsqueeze(0)).sum(0)
        return (total[0] / total[1]).item() if total[1] > 0 else 0.0

    def _log_step_metrics(self, mode, ctx: LossContext, result, outputs, inputs) -> None:
        metrics = self._metrics[mode]
        mask = ctx.mask
        def per_token(name):  # a per-token output of the fused head, [K, B, T]
            return self.to_grid(inputs, getattr(outputs, name)[:, -mask.size(-1) :])

        if getattr(outputs, "entropy", None) is not None:
            metrics["entropy"].append(self._gathered_ratio(per_token("entropy") * mask, mask))
        if getattr(outputs, "mean_logits", None) is not None and ctx.num_sequences > 1:
            mean_logits = per_token("mean_logits")
            metrics["logits/chosen"].append(self._gathered_ratio(mean_logits[0] * mask[0], mask[0]))
            metrics["logits/rejected"].append(self._gathered_ratio(mean_logits[1] * mask[1], mask[1]))
        if getattr(outputs, "is_top1", None) is not None:
            top1 = per_token("is_top1")[0]
            metrics["mean_token_accuracy"].append(self._gathered_ratio(top1 & mask[0].bool(), mask[0]))
        if TRUNCATED in inputs:  # the fraction of this step's sequences that max_length cut
            truncated = inputs[TRUNCATED].reshape(1).float()  # of the batch's real sequences (its rows)
            sequences = truncated.new_tensor([inputs["input_ids"].size(0)])
            metrics["truncated"].append(self._gathered_ratio(truncated, sequences))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        append_pair_metrics(metrics, ctx.logps(), result.rewards, self._gathered_mean)
        for name, value in result.metrics.items():
            metrics[name].append(self._gathered_mean(value))

    # -- optimiser, sampler ------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """transformers' optimiser; with named adapters one parameter group per adapter (and per weight-decay class)
        at ``learning_rate × lr_scale``, so the scheduler scales every group alike."""
        if not self.adapter_lr_scales or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple, list] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                adapter = next((a for a in self.trained_adapters if f".{a}." in name), None)
                groups.setdefault((adapter, name in decay), []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls([
            {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
             "lr": self.args.learning_rate * self.adapter_lr_scales.get(adapter, 1.0)}
            for (adapter, decays), params in groups.items()
        ], **optimizer_kwargs)  # fmt: skip
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """The method's :meth:`~trl_plus.Method.sampler` (seeded by ``args.seed``), else transformers' own."""
        if type(self.method).sampler is Method.sampler:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        generator = torch.Generator().manual_seed(self.args.seed)
        custom = self.method.sampler(dataset, self._train_batch_size, generator)
        return super()._get_train_sampler(train_dataset) if custom is None else custom

    # -- saving ---------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """transformers' resume; named adapters are all loaded back, each still trainable (transformers would make
        only the first trainable)."""
        if not self.named_adapters:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint, self.trained_adapters)

    def _save(self, output_dir=None, state_dict=None):
        # transformers draws a "Writing model shards" bar at every save (1/1 for most models), inside the training bar
        from transformers.utils import logging as transformers_logging

        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        policy = self.accelerator.unwrap_model(self.model)
        extra = is_peft_model(policy) and len(policy.peft_config) > 1  # frozen teacher / reference adapters
        if extra:  # a checkpoint or the final model holds the trained adapter(s) only (the others are read-only)
            trained = self.trained_adapters if self.named_adapters else [policy.active_adapter]
            policy.save_pretrained = functools.partial(type(policy).save_pretrained, policy,
                                                       selected_adapters=trained)  # fmt: skip
        try:
            super()._save(output_dir, state_dict)
        finally:
            if extra:
                del policy.save_pretrained
            if shown:
                transformers_logging.enable_progress_bar()
