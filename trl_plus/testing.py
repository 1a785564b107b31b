"""Test helpers for trl-plus and for plugin authors (also a pytest plugin: the fixtures below are auto-loaded).

- :func:`make_context` builds a :class:`~trl_plus.LossContext` from ragged per-token log-prob lists, so a card's
  worked example is a few lines.
- :func:`registered` registers a throw-away method for the duration of a ``with`` block.
- :func:`preference_rows` makes small synthetic prompt/chosen/rejected rows; :func:`train_tiny` runs a few real
  optimiser steps of any method on the tiny offline model and returns the trainer.
- :func:`build_tokenizer`, :func:`build_model`, :func:`save_tiny_model`: the tiny model itself, for tests that build
  trainers by hand.
- Fixtures: ``tiny_model_dir`` (a saved tiny Llama + tokenizer), ``preference_file`` (a jsonl of synthetic pairs).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .contract import LossContext, Method, hookimpl
from .models.tiny import build_model, build_tokenizer, save_tiny_model
from .registry import get_registry

__all__ = [
    "CPU_OVERRIDES", "build_model", "build_tokenizer", "cli", "diffusion_batch", "diffusion_loss", "diffusion_rows", "forbid_reference", "logits_head",
    "make_context", "perturb", "tiny_diffusion_bundle", "tiny_diffusion_trainer", "tiny_text_encoder",
    "preference_rows", "registered", "run_metric", "run_recipe_on_cpu", "save_tiny_adapter", "save_tiny_model", "tiny_trainer",
    "train_tiny",
    "training_logs", "write_jsonl",
]  # fmt: skip

# -- loss contexts from hand-written numbers ---------------------------------------------------------------


def _pad(sequences: Sequence[Sequence[Sequence[float]]]):
    import torch

    num_sequences, batch = len(sequences), len(sequences[0])
    length = max(len(tokens) for seq in sequences for tokens in seq)
    values = torch.zeros(num_sequences, batch, length, dtype=torch.float64)
    mask = torch.zeros_like(values)
    for k, seq in enumerate(sequences):
        for b, tokens in enumerate(seq):
            values[k, b, : len(tokens)] = torch.tensor(tokens, dtype=torch.float64)
            mask[k, b, : len(tokens)] = 1
    return values, mask


def make_context(
    policy: Sequence[Sequence[Sequence[float]]],
    reference: Sequence[Sequence[Sequence[float]]] | None = None,
    requires_grad: bool = True,
    **kwargs: Any,
) -> LossContext:
    """A :class:`LossContext` from per-token log-probs given as ``[K][B][tokens]`` nested lists (float64).

    ``policy[0]`` are the chosen sequences, ``policy[1]`` the rejected ones. A sequence-level example (only sums
    on the card) is a one-token list: ``[[-12.0], [-20.0]]``. ``ctx.token_logps.grad`` holds the gradient after
    ``loss.backward()``. Extra keyword arguments go to :class:`LossContext` (e.g. ``batch={...}``).
    """
    values, mask = _pad(policy)
    values.requires_grad_(requires_grad)
    ref = None
    if reference is not None:
        ref, ref_mask = _pad(reference)
        if ref.shape != values.shape or not bool((ref_mask == mask).all()):
            raise ValueError("reference must have the same shape (sequences and token counts) as policy")
    return LossContext(token_logps=values, mask=mask, ref_token_logps=ref, **kwargs)


def adapter_context(reference: Sequence[Sequence[Sequence[float]]] | None, adapters: dict[str, Any],
                    **kwargs: Any) -> LossContext:  # fmt: skip
    """A :class:`LossContext` of named adapters (``Needs.policy_adapters``): ``adapters`` maps each name to its
    per-token log-probs (``[K][B][tokens]``, as :func:`make_context`), all on one ``reference``;
    ``ctx.for_adapter(name)`` gives each (with gradients on), ``ctx`` itself is the first."""
    contexts = {name: make_context(policy, reference, **kwargs) for name, policy in adapters.items()}
    first = next(iter(contexts.values()))
    first.adapters = contexts
    return first


def logits_head(logits):
    """A ``LossContext.head`` over given full policy logits ``[K, B, T, V]`` (keep ``requires_grad`` on them to test
    gradients): ``ctx.logps_at(ids)`` and ``ctx.scored_logits()`` of a hand-made context read them, as the trainer's
    head reads the policy's hidden states. Pass it as ``make_context(..., head=logits_head(logits))``."""
    from .trainers.heads import LogitsHead

    return LogitsHead(logits)


# -- registering a method for one test -------------------------------------------------------------------------


@contextlib.contextmanager
def registered(*methods: type[Method], name: str = "test-plugin", commands: Sequence[tuple] = (),
               environments: Sequence[type] = ()) -> Iterator[None]:  # fmt: skip
    """Register ``methods`` (``commands``: ``(name, help, add_arguments, run)`` tuples, as the
    ``register_commands`` hook takes them; ``environments``: :class:`~trl_plus.Environment` classes) as if a
    plugin called ``name`` had, and unregister them afterwards."""

    class _Plugin:
        @hookimpl
        def register_methods(self, register):
            for method in methods:
                register(method)

        @hookimpl
        def register_commands(self, register):
            for command in commands:
                register(*command)

        @hookimpl
        def register_environments(self, register):
            for environment in environments:
                register(environment)

    registry = get_registry()
    registry.add_plugin(_Plugin(), name=name, source=name)
    try:
        yield
    finally:
        registry.remove_plugin(name)


# -- synthetic data -----------------------------------------------------------------------------------------------

_TASKS = [
    ("What is {a} + {b}?", "{a} + {b} = {s}.", "I do not know."),
    ("Add {a} and {b}.", "The sum is {s}.", "Numbers are boring."),
    ("Please write the number {a} in digits.", "{a}", "No."),
    ("Count from {a} to {c}.", "{seq}", "Counting is not something I do."),
    ("Is {a} bigger than {b}?", "{cmp}", "Maybe, maybe not."),
]


def preference_rows(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` synthetic rows ``{"prompt", "chosen", "rejected"}``: a helpful answer vs an unhelpful one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, chosen, rejected = rng.choice(_TASKS)
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        c = a + rng.randint(2, 4)
        values = {
            "a": a, "b": b, "c": c, "s": a + b, "seq": ", ".join(str(i) for i in range(a, c + 1)),
            "cmp": f"Yes, {a} is bigger than {b}." if a > b else f"No, {a} is not bigger than {b}.",
        }  # fmt: skip
        rows.append({k: t.format(**values) for k, t in zip(("prompt", "chosen", "rejected"), (prompt, chosen, rejected))})
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> str:
    """Write ``rows`` as JSON lines; return the path."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# -- a few real steps on the tiny model ------------------------------------------------------------------------


def tiny_trainer(
    method: str | Method | type[Method],
    output_dir: str | Path,
    method_args: dict[str, Any] | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
    max_steps: int = 8,
    learning_rate: float = 5e-3,
    reference_mode: str = "auto",
    training: dict[str, Any] | None = None,
    model: Any = None,
    **trainer_kwargs: Any,
):
    """A :class:`~trl_plus.PlusTrainer` for ``method`` on the tiny offline model (seeded: every call builds
    the same weights; or ``model``, any causal LM over the tiny tokenizer's vocabulary) and ``rows`` (default: 32 synthetic pairs), not yet trained: for "the same batch through two
    methods" tests. ``training`` overrides ``trl.DPOConfig`` fields (e.g. ``{"max_length": 64}``, or
    ``{"report_to": ["tensorboard"]}``)."""
    from datasets import Dataset
    from trl import DPOConfig

    from .run.train import launched_without_gpus
    from .trainers.preference import PlusTrainer

    tokenizer = build_tokenizer()
    defaults = dict(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate, per_device_train_batch_size=8,
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, activation_checkpointing=False,
        disable_tqdm=True, seed=0, dataloader_pin_memory=False, use_cpu=launched_without_gpus(),
    )  # fmt: skip
    args = DPOConfig(**{**defaults, **(training or {})})  # training may override any of these (report_to too)
    dataset = Dataset.from_list(list(rows or preference_rows(32)))
    return PlusTrainer(
        build_model(tokenizer) if model is None else model, args=args, method=method, method_args=method_args,
        reference_mode=reference_mode,
        train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs,
    )  # fmt: skip


def tiny_group_trainer(
    method: str | Method | type[Method],
    output_dir: str | Path,
    method_args: dict[str, Any] | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
    scorers: Sequence[tuple[Any, Any]] | None = None,
    rollout: Any = None,
    max_steps: int = 8,
    learning_rate: float = 1e-2,
    training: dict[str, Any] | None = None,
    model: Any = None,
    **trainer_kwargs: Any,
):
    """A :class:`~trl_plus.PlusGRPOTrainer` for the group method ``method`` on the tiny offline model (seeded), not yet
    trained: ``rows`` are prompts (default: 32 ``"Count to i:"``), ``scorers`` ``(Scorer, weight)`` pairs (default:
    ``digits``), ``rollout`` a :class:`~trl_plus.Rollout` (default: 4 completions of 16 tokens at temperature 1),
    ``training`` overrides ``trl.GRPOConfig`` fields (default batch: 8 completions = 2 prompts per step)."""
    from datasets import Dataset
    from trl import GRPOConfig

    from .contract import Rollout
    from .registry import get_registry
    from .trainers.group import PlusGRPOTrainer

    tokenizer = build_tokenizer()
    defaults = dict(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate, per_device_train_batch_size=8,
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, activation_checkpointing=False,
        disable_tqdm=True, seed=0, dataloader_pin_memory=False, use_cpu=True,
    )  # fmt: skip
    args = GRPOConfig(**{**defaults, **(training or {})})
    if scorers is None:
        digits = get_registry().get_scorer("digits")
        scorers = [(digits(digits.Config()), 1.0)]
    rows = rows if rows is not None else [{"prompt": f"Count to {i}:"} for i in range(32)]
    return PlusGRPOTrainer(
        build_model(tokenizer) if model is None else model, method=method, method_args=method_args, args=args,
        train_dataset=Dataset.from_list(list(rows)), processing_class=tokenizer, scorers=scorers,
        rollout=rollout or Rollout(n=4, decoding={"max_new_tokens": 16, "temperature": 1.0}), **trainer_kwargs,
    )  # fmt: skip


def train_tiny(method: str | Method | type[Method], output_dir: str | Path, **kwargs: Any):
    """Train ``method`` on the tiny offline model (:func:`tiny_trainer`'s arguments, ``max_steps`` default 8);
    return the trainer.

    Useful for the "a few optimiser steps raise the method's margin" test every plugin should have: compare the
    first and the last of :func:`training_logs`.
    """
    trainer = tiny_trainer(method, output_dir, **kwargs)
    trainer.train()
    return trainer


def run_metric(metric: Any, trainer: Any, rows: Sequence[dict[str, Any]] | None = None,
               out_dir: str | Path | None = None):
    """``metric`` (a :class:`~trl_plus.Metric` instance) run by ``trainer`` (e.g. :func:`tiny_trainer`'s) on
    ``rows`` (default: 8 synthetic pairs), exactly as ``trl-plus eval`` and the recipe's ``metrics:`` run it;
    returns its ``MetricResult`` (``.summary``, ``.values``, ``.artefacts`` written under ``out_dir``)."""
    from datasets import Dataset

    data = {"eval": Dataset.from_list(list(rows or preference_rows(8)))}
    return trainer.run_metrics([metric], data, out_dir)["eval"][metric.name]


CPU_OVERRIDES = (
    "model.name_or_path=tiny-llama", "model.dtype=float32", "model.quantization=null",
    "data.train.path=recipes/data/quickstart_prefs.jsonl", "data.train.limit=16", "data.eval=null",
    "training.max_steps=2", "training.activation_checkpointing=false", "training.disable_tqdm=true",
    "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
)  # fmt: skip


def training_logs(trainer) -> list[dict[str, Any]]:
    """The training log entries (one per logged step, the final summary left out) of a finished trainer."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


#: ``training`` of :func:`tiny_recipe`: quiet, seeded, no checkpoints, one log per step, a constant learning rate.
TINY_TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
                 "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "activation_checkpointing": False,
                 "report_to": "none", "seed": 0}  # fmt: skip


def tiny_recipe(tmp_path: str | Path, method: str, rows: Sequence[dict[str, Any]], **blocks: Any) -> str:
    """A recipe file for ``method`` on the tiny offline model (``tiny-llama``, float32) and ``rows`` (written as
    ``tmp_path/data.jsonl``), its runs under ``tmp_path/run``: ``blocks`` are further recipe blocks (``rollout``,
    ``iterations``, ``method_args``, ``model``...), ``training`` merged over :data:`TINY_TRAINING`. Returns its
    path (``tmp_path/recipe.yaml``)."""
    import yaml

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = {"method": method, "model": {"name_or_path": "tiny-llama", "dtype": "float32", **blocks.pop("model", {})},
              "data": {"train": {"path": write_jsonl(rows, tmp_path / "data.jsonl")}}, **blocks,
              "training": {"output_dir": str(tmp_path / "run"), **TINY_TRAINING, **blocks.get("training", {})}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


def iteration_firsts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The first logged training step of each iteration of an iterated run (its ``trainer_state.json``): where its
    first loss and the ``rollout/*`` figures of the samples it trained on are."""
    import json

    logs = json.loads((Path(run_dir) / "trainer_state.json").read_text())["log_history"]
    count = max((e.get("iteration", 0) for e in logs), default=0)
    return [next(e for e in logs if e.get("iteration") == t and "loss" in e) for t in range(1, count + 1)]


def forbid_reference(monkeypatch) -> None:
    """Make any reference forward fail the test: for the "a reference-free method never pays for a reference"
    check (``monkeypatch`` is pytest's fixture)."""
    from .trainers.preference import PlusTrainer

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free method asked for reference log-probs")

    monkeypatch.setattr(PlusTrainer, "reference_token_logps", no_reference)
    monkeypatch.setattr(PlusTrainer, "frozen_token_logps", no_reference)


def interrupt_at_step(monkeypatch, step: int, trainer_cls: Any = None) -> None:
    """Make the ``step``-th training step (counted from now, across ``train()`` calls: stages, iterations) raise
    ``KeyboardInterrupt``, as Ctrl-C would; ``monkeypatch.undo()`` (or a fresh monkeypatch) restores training."""
    if trainer_cls is None:
        from .trainers.preference import PlusTrainer as trainer_cls
    original = trainer_cls.training_step
    calls = {"n": 0}

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "training_step", training_step)


def forbid_model_loading(monkeypatch) -> None:
    """Make loading any model or tokenizer fail the test: for the "bad input is reported before any model loads"
    check (``monkeypatch`` is pytest's fixture)."""
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the recipe and data were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", no_model)


def run_recipe_on_cpu(recipe: str | Path, output_dir: str | Path, *overrides: str):
    """Validate a (7B, QLoRA) recipe as written, then train it for 2 steps on the tiny CPU model.

    Run from the repository root (the quickstart data lives in ``recipes/data``). LoRA layer indices that the
    tiny model lacks are dropped. Returns the :class:`~trl_plus.run.train.TrainResult`.
    """
    from .config import load_recipe
    from .run.train import train
    from .run.validate import check_recipe

    check_recipe(load_recipe(recipe, ["data.train.path=recipes/data/quickstart_prefs.jsonl", "data.eval=null"]))
    extra = ["model.lora.layers=null"] if (load_recipe(recipe).model.lora or None) is not None else []
    return train(recipe, [*CPU_OVERRIDES, *extra, f"training.output_dir={output_dir}", *overrides])


def save_tiny_adapter(base_dir: str | Path, directory: str | Path, seed: int = 1, r: int = 4) -> str:
    """A LoRA adapter (random, non-zero: it changes the outputs) on the saved model ``base_dir``, written to
    ``directory`` as a LoRA run saves it: a teacher adapter for ``Teacher(adapter=...)`` / ``teachers.<name>.adapter``
    tests. Returns the path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    return str(directory)


def launch(*argv: str, processes: int = 2, timeout: float = 300):
    """Run ``accelerate launch`` with ``processes`` CPU processes (DDP over gloo) on ``argv`` — a script and its
    arguments, or ``"-m", "trl_plus", ...`` — from the repository root; return the finished
    ``subprocess.CompletedProcess`` (text output). ``--multi_gpu`` is what starts several processes; on a machine
    without GPUs trl-plus trains them on the CPU (``accelerate launch --cpu`` would start only one). Each launch
    takes a free port of its own: tests run in parallel would otherwise all bind accelerate's default 29500."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *argv],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=timeout, env=env,
    )  # fmt: skip


def cli(*argv: str) -> int:
    """Run the ``trl-plus`` command in this process (``cli("merge", run_dir)``); returns its exit code."""
    from .cli import main

    return main(list(argv))


def perturb(model, seed: int = 0, scale: float = 0.05) -> None:
    """Add the same seeded noise to every parameter, so two copies of a model stay identical but leave their
    initial state (and a loss leaves its value at initialisation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


# -- diffusion: tiny denoisers on synthetic latents -------------------------------------------------------------


def diffusion_rows(n: int = 8, k: int = 2, shape: tuple[int, ...] = (4, 8, 8), seed: int = 0, same: bool = False,
                   prompts: int = 3) -> list[dict[str, Any]]:  # fmt: skip
    """``n`` rows ``{"prompt", "x0": [k, *shape]}`` of random latents (``same``: the k images of a row are equal),
    ready for :class:`~trl_plus.diffusion.trainer.DiffusionTrainer` without a VAE."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x0 = torch.randn(1 if same else k, *shape, generator=generator)
        rows.append({"prompt": f"prompt {i % prompts}", "x0": x0.repeat(k, *([1] * len(shape))) if same else x0})
    return rows


def tiny_text_encoder(pooled: bool = False, length: int = 16, hidden: int = 32, pooled_dim: int = 64):
    """A frozen stand-in text encoder: each prompt -> a fixed random embedding ``[length, hidden]`` (seeded by the
    prompt's CRC32; ``pooled``: also ``[pooled_dim]``), as ``DiffusionTrainer(encode_prompts=...)`` takes it."""
    import zlib

    import torch

    def encode(texts):
        generators = [torch.Generator().manual_seed(zlib.crc32(t.encode())) for t in texts]
        out = {"text": torch.stack([torch.randn(length, hidden, generator=g) for g in generators])}
        if pooled:
            out["pooled"] = torch.stack([torch.randn(pooled_dim, generator=g) for g in generators])
        return out

    return encode


def checked_split(recipe: Any, split: str = "train"):
    """A recipe's split as ``trl-plus train`` reads it before any model loads: the recipe checked, the rows checked
    and prepared (a method's ``prepare_split`` / ``prepare_data``); its one-line errors raised as they are."""
    from .run.validate import check_recipe, load_split

    method, _ = check_recipe(recipe)
    return load_split(recipe, method, split)


def tiny_unet(seed: int = 0, **kwargs: Any):
    """The ``tiny-sd`` denoiser (:func:`trl_plus.diffusion.tiny.tiny_unet`), seeded."""
    from .diffusion.tiny import tiny_unet as build

    return build(seed=seed, **kwargs)


def load_method_weights(denoiser: Any, names: Sequence[str], folder: str | Path) -> None:
    """Load the parameters a method added to a denoiser (``DiffusionMethod.prepare_denoiser``) from a saved run
    folder's ``method_weights.safetensors``."""
    from .diffusion.models import load_added_parameters

    load_added_parameters(denoiser, list(names), folder)


def official_ddim_logprob(scheduler, x_t, eps, x_prev, t, prev_t, eta: float = 1.0):
    """``[N]`` D3PO's ``ddim_step_with_logprob`` (yk7333/d3po ``d3po_pytorch/diffusers_patch/ddim_with_logprob.py``),
    written out independently of the core's sampler for tests: the element-mean Gaussian log-density of ``x_prev``
    under the DDIM(η) step from ``x_t`` with the ε-prediction ``eps`` (timesteps ``t`` -> ``prev_t``, ``[N]``; a
    negative ``prev_t`` lands on ᾱ = 1)."""
    import math

    import torch

    alphas = scheduler.alphas_cumprod.float()
    shape = (-1, *([1] * (x_t.dim() - 1)))
    a_t = alphas[t].view(shape)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], torch.tensor(1.0)).view(shape)
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    log_prob = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def tiny_diffusion_bundle(target: str = "epsilon", lora: bool = False, nf4: bool = False, seed: int = 0):
    """A :class:`~trl_plus.diffusion.models.DiffusionBundle` without a pipeline: the ``tiny-sd`` UNet with a DDPM
    scheduler (``target`` ``epsilon`` / ``v_prediction`` / ``sample``) or, for ``flow``, the ``tiny-sd3`` transformer
    with a flow-matching scheduler; ``video``: the ``tiny-wan`` transformer (latents ``[4, F, 8, 8]``) with an
    unshifted flow-matching scheduler (timestep = 1000·σ); ``nf4``: its transformer-block linears 4-bit (the CPU
    swap); ``lora``: r = 4 on the attention projections. Text: :func:`tiny_text_encoder` (``pooled`` for ``flow``)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from .config import LoraSpec
    from .diffusion.models import DiffusionBundle, add_lora, quantize_nf4
    from .diffusion.tiny import tiny_sd3_transformer, tiny_unet, tiny_wan_transformer

    if target == "video":
        denoiser = tiny_wan_transformer(seed=seed)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    elif target == "flow":
        denoiser = tiny_sd3_transformer(seed=seed)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        denoiser = tiny_unet(seed=seed)
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=target, clip_sample=False)
    if nf4:
        quantize_nf4(denoiser)
    if lora:
        add_lora(denoiser, LoraSpec(r=4, alpha=4, dropout=0.0, target_modules="all-linear"))
    return DiffusionBundle(denoiser, scheduler, quantization="cpu-nf4-swap" if nf4 else None, lora=lora)


def tiny_diffusion_trainer(method: Any, output_dir: str | Path, *, target: str = "epsilon", lora: bool = False,
                           nf4: bool = False, rows: Sequence[dict[str, Any]] | None = None, max_steps: int = 4,
                           learning_rate: float = 1e-4, batch_size: int = 2, training: dict[str, Any] | None = None,
                           method_args: dict[str, Any] | None = None, reference_mode: str = "auto",
                           **trainer_kwargs: Any):  # fmt: skip
    """A :class:`~trl_plus.diffusion.trainer.DiffusionTrainer` for ``method`` on :func:`tiny_diffusion_bundle` and
    ``rows`` (default: 8 random pairs of 8x8x4 latents), not yet trained; seeded (every call builds the same
    weights and draws; ``target="video"``: the ``tiny-wan`` transformer, rows of 4x4x8x8 video latents by default).
    ``training`` overrides ``DiffusionConfig`` fields."""
    import torch

    from .diffusion.trainer import DiffusionConfig, DiffusionTrainer

    bundle = tiny_diffusion_bundle(target, lora=lora, nf4=nf4)
    defaults = dict(output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate,
                    per_device_train_batch_size=batch_size, logging_steps=1, report_to="none", save_strategy="no",
                    disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False)
    args = DiffusionConfig(**{**defaults, **(training or {})})
    encode = tiny_text_encoder(pooled=target == "flow", hidden=64 if target == "flow" else 32)
    if rows is None:
        rows = diffusion_rows(shape=(4, 4, 8, 8)) if target == "video" else diffusion_rows()
    return DiffusionTrainer(bundle, args, method=method, method_args=method_args, reference_mode=reference_mode,
                            train_dataset=list(rows), encode_prompts=encode,
                            **trainer_kwargs)  # fmt: skip


def diffusion_batch(trainer, rows: int | None = None) -> dict[str, Any]:
    """The collated first ``rows`` examples (default: all) of a diffusion trainer's training data, on its device."""
    examples = trainer.train_dataset if rows is None else trainer.train_dataset[:rows]
    return trainer._prepare_inputs(trainer.data_collator(list(examples)))


def diffusion_loss(trainer, batch: dict[str, Any], seed: int = 0):
    """The method's :class:`~trl_plus.LossOutput` on ``batch`` with the (t, ε) draws of ``seed`` (the same seed:
    the same draws, whichever method or trainer): for "method A on these draws equals method B" tests."""
    import torch

    from .contract import LossContext

    score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(seed))
    k, b = batch["num_sequences"], batch["prompt_ids"].size(0)

    def grid(rows):
        return None if rows is None else rows.view(k, b, *rows.shape[1:])

    ctx = LossContext(token_logps=grid(score.logps), mask=grid(score.mask), ref_token_logps=grid(score.ref_logps),
                      batch=batch, outputs=score)  # fmt: skip
    return trainer.method.loss(ctx)


# -- pytest fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny random Llama with its character tokenizer (``from_pretrained`` loads it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (restored after): the tiny model gains nothing from more, and a
    training test stays fast on a machine busy with other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def preference_file(tmp_path) -> str:
    """A jsonl file of 32 synthetic prompt/chosen/rejected rows."""
    return write_jsonl(preference_rows(32), tmp_path / "prefs.jsonl")
