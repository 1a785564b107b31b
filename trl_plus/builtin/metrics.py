"""The core's metric and scorers, registered through the same hooks as a plugin's (``register_metrics``,
``register_scorers``), and the three accuracy conventions every pairwise figure uses.

Three conventions of "the share of pairs ranked right" coexist in the literature and in this library; they give
different numbers on the same pairs whenever there are ties (an untrained policy equal to its reference ties every
implicit reward at 0), so each is named apart (:func:`pair_accuracy`'s ``ties``):

- ``"half"``: a tie counts one half — the held-out table of ``trl-plus eval`` / ``eval_report.json`` (chance = 0.5);
- ``"lose"``: strict ``>`` — TRL's ``rewards/accuracies`` and DPORM accuracy (policy == reference gives 0);
- ``"win"``: ``≥`` — ranking accuracy (Chen et al. 2024, Theorem 4.1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..contract import LossContext, MethodConfig, Metric, Needs, Scorer

Ties = Literal["half", "lose", "win"]


def pair_accuracy(better: Any, worse: Any, ties: Ties = "half") -> Any:
    """``[N]`` per-pair accuracy of ``better > worse`` as floats (tensors of any float dtype): 1 when ranked right,
    0 when wrong, and a tie counted as ``ties`` says (``"half"`` → 0.5, ``"lose"`` → 0, ``"win"`` → 1). Take the
    mean for the accuracy."""
    right = (better > worse).to(better.dtype if better.is_floating_point() else None)
    tied = (better == worse).to(right.dtype)
    return right + {"half": 0.5, "lose": 0.0, "win": 1.0}[ties] * tied


def pair_figures(chosen: Any, rejected: Any, lengths: Any, reference: Any = None, beta: float = 0.1) -> dict:
    """The held-out figures of one model from per-pair sequence log-probs ``chosen``, ``rejected`` ``[N]``, completion
    ``lengths`` ``[N, 2]`` and, when given, the reference's ``[N, 2]`` log-probs (see ``trl_plus.run.evaluate``):
    likelihood ranking accuracy (ties ½; also per token), mean log-probs, and against the reference the implicit-
    reward accuracy (ties ½), margin ``β·Δ`` and the mean log-ratio ``log πθ/πref`` per completion."""
    lengths = lengths.clamp(min=1)
    out = {
        "likelihood_accuracy": pair_accuracy(chosen, rejected).mean().item(),
        "normalized_likelihood_accuracy": pair_accuracy(chosen / lengths[:, 0], rejected / lengths[:, 1]).mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
    }
    if reference is not None:
        ratios = (chosen - reference[:, 0], rejected - reference[:, 1])
        margins = beta * (ratios[0] - ratios[1])
        out["reward_accuracy"] = pair_accuracy(margins, margins.new_zeros(())).mean().item()
        out["reward_margin"] = margins.mean().item()
        out["log_ratio"] = (ratios[0] + ratios[1]).mean().item() / 2
    return out


def length_figures(lengths: Any) -> dict[str, float]:
    """Completion lengths ``[N, 2]`` (chosen, rejected) of the pairs, in tokens."""
    chosen, rejected = lengths[:, 0], lengths[:, 1]
    return {
        "pairs": float(len(chosen)),
        "chosen_tokens": chosen.mean().item(),
        "rejected_tokens": rejected.mean().item(),
        "chosen_longer": (chosen > rejected).double().mean().item(),
    }


class PairsConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="β of the implicit reward β·(log πθ − log πref) (DPO's default 0.1)")


class Pairs(Metric):
    """Today's held-out table as a metric: how the model ranks chosen vs rejected, by likelihood and, when the run has
    a reference, by implicit reward (the figures of ``eval_report.json``, ties counted ½) and the pairs' lengths."""

    name = "pairs"
    summary = "held-out pair ranking: likelihood and implicit-reward accuracy (ties ½), margin, log-ratio, lengths"
    needs = Needs(reference="optional")
    Config = PairsConfig

    def batch(self, ctx: LossContext) -> dict[str, Any]:
        import torch

        values = {"logps": ctx.logps().double().T, "lengths": ctx.lengths.double().T}  # [B, 2] each
        if ctx.ref_token_logps is not None:
            values["ref_logps"] = ctx.ref_logps().double().T
        return {key: torch.as_tensor(value) for key, value in values.items()}

    def summarize(self, values) -> dict[str, float]:
        import torch

        logps, lengths = torch.stack(values["logps"]), torch.stack(values["lengths"])
        reference = torch.stack(values["ref_logps"]) if values.get("ref_logps") else None
        return pair_figures(logps[:, 0], logps[:, 1], lengths, reference, self.config.beta) | length_figures(lengths)


# -- scorers --------------------------------------------------------------------------------------------------------


class LengthConfig(MethodConfig):
    unit: Literal["tokens", "characters", "words"] = Field(
        "tokens", description="what is counted: the completion's tokens (the run's tokenizer), characters or words")
    scale: float = Field(1.0, description="multiplies the count (−1: MODPO's margin reward r = −|y|)")


class Length(Scorer):
    """The completion's length: tokens of the run's tokenizer (the completion as TRL tokenizes it, EOS included),
    characters or words; times ``scale``."""

    name = "length"
    summary = "completion length in tokens, characters or words (times scale)"
    outputs = ("length",)
    Config = LengthConfig

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        import torch

        from ..data.tokenize import tokenize_completions

        unit = self.config.unit
        if unit == "tokens":
            if self.tokenizer is None:
                raise ValueError("unit tokens needs the run's tokenizer (--model)")
            counts = [len(tokenize_completions(self.tokenizer, p, {"y": c})["y"]) for p, c in zip(prompts, completions)]
        else:
            texts = [_text(c) for c in completions]
            counts = [len(t) if unit == "characters" else len(t.split()) for t in texts]
        return self.config.scale * torch.tensor(counts, dtype=torch.float64).unsqueeze(-1)


def _text(completion: Any) -> str:
    """A completion's text: a string, or the contents of its chat messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


class ModelScorerConfig(MethodConfig):
    batch_size: int = Field(8, ge=1, description="completions per forward pass")
    max_length: int | None = Field(None, ge=1, description="tokens kept per sequence (None: all)")


class ImplicitRewardConfig(ModelScorerConfig):
    adapter: str = Field(description="a LoRA adapter folder (as a LoRA run saves it); its base is the reference")
    beta: float = Field(0.1, gt=0, description="β of β·(log π_adapter − log π_base) (MODPO: the run's β)")


class ImplicitReward(Scorer):
    """DPO's implicit reward of an adapter against its base: ``β·(log π_adapter(y|x) − log π_base(y|x))``, summed
    over the completion's tokens (MODPO's margin reward from a model trained on another objective)."""

    name = "implicit-reward"
    summary = "β·(log π_adapter − log π_base) of the completion, for a LoRA adapter folder"
    outputs = ("implicit_reward",)
    Config = ImplicitRewardConfig

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        model = adapter_model(self.config.adapter, device=self.device)
        with_adapter = _sequence_logps(model, self.tokenizer, prompts, completions, self.config)
        with model.disable_adapter():
            base = _sequence_logps(model, self.tokenizer, prompts, completions, self.config)
        return (self.config.beta * (with_adapter - base)).unsqueeze(-1)


def adapter_model(path: str, device: Any = None) -> Any:
    """A saved LoRA adapter folder on its base model (``base_model_name_or_path`` of its ``adapter_config.json``),
    frozen, in eval mode: ``with model.disable_adapter():`` gives the base."""
    import json
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise ValueError(f"{path} holds no adapter_config.json (a LoRA adapter folder, as a LoRA run saves it)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(base)
    if device is not None:
        model.to(device)
    return PeftModel.from_pretrained(model, str(path), is_trainable=False).eval()


def _sequence_logps(model: Any, tokenizer: Any, prompts: list, completions: list, config: Any) -> Any:
    """``[N]`` summed completion log-probs (float64) of ``completions`` given ``prompts``, tokenized as TRL does."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    from ..data.collate import PairwiseCollator
    from ..data.tokenize import tokenize_completions

    if tokenizer is None:
        raise ValueError("this scorer needs the run's tokenizer (--model)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(prompts), config.batch_size):
            rows = []
            for p, c in zip(prompts[start : start + config.batch_size], completions[start : start + config.batch_size]):
                ids = tokenize_completions(tokenizer, p, {"y": c})
                rows.append({"prompt_ids": ids["prompt_ids"], "chosen_ids": ids["y"], "rejected_ids": ids["y"]})
            batch = PairwiseCollator(pad_token_id=pad, max_length=config.max_length)(rows)
            n = len(rows)
            ids, mask = batch["input_ids"][:n].to(device), batch["completion_mask"][:n].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"][:n].to(device)).logits[:, :-1]
            logps = selective_log_softmax(logits.float(), ids[:, 1:]) * mask[:, 1:]
            out.append(logps.double().sum(-1).cpu())
    return torch.cat(out)


class RewardModelConfig(ModelScorerConfig):
    model: str = Field(description="a sequence-classification reward model (a folder or hub id)")
    label: int = Field(0, ge=0, description="which output of the model is the reward (its num_labels > 1)")


class RewardModel(Scorer):
    """A reward model's score of the conversation prompt + completion (``AutoModelForSequenceClassification``; the
    model's own tokenizer and chat template)."""

    name = "reward-model"
    summary = "a sequence-classification reward model's score of prompt + completion"
    outputs = ("reward",)
    Config = RewardModelConfig

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = self.config.model
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.device is not None:
            model.to(self.device)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        texts = [_conversation(tokenizer, p, c) for p, c in zip(prompts, completions)]
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.config.batch_size):
                enc = tokenizer(texts[start : start + self.config.batch_size], return_tensors="pt", padding=True,
                                truncation=self.config.max_length is not None, max_length=self.config.max_length)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                out.append(model(**enc).logits[:, self.config.label].double().cpu())
        return torch.cat(out).unsqueeze(-1)


def _conversation(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt + completion as one text: the chat template's when the data are messages, else concatenated."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]) + (
        completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}])
    return tokenizer.apply_chat_template(messages, tokenize=False)


METRICS = (Pairs,)
SCORERS = (Length, ImplicitReward, RewardModel)
