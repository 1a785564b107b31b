"""The core's scorers, registered through ``register_scorers`` like a plugin's: ``length``, ``implicit-reward`` (an
adapter against its base), ``reward-model`` (a sequence-classification model), and the rule scorers online runs and
tests use (``keyword``, ``regex``, ``digits``, ``exact-answer``); for diffusion runs the image scorers ``brightness``,
``ink`` (pixels) and ``latent-mean`` (latents, differentiable)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, model_validator

from ..contract import MethodConfig, Scorer


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
    label: NonNegativeInt | list[NonNegativeInt] = Field(
        0, description="which output of the model is the reward (its num_labels > 1); a list: a vector reward, one "
                       "scorer output per label (a k-head model's attributes, e.g. DPA's helpfulness, verbosity)")
    names: list[str] | None = Field(None, description="the outputs' names, one per label (default: reward, or "
                                                      "label_<i> for a list of labels)")  # fmt: skip

    @model_validator(mode="after")
    def _one_name_per_label(self) -> RewardModelConfig:
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.labels)} label(s) but {len(self.names)} name(s)")
        return self

    @property
    def labels(self) -> list[int]:
        """The model outputs read, in order."""
        return self.label if isinstance(self.label, list) else [self.label]


class RewardModel(Scorer):
    """A reward model's score of the conversation prompt + completion (``AutoModelForSequenceClassification``; the
    model's own tokenizer and chat template); several ``label`` s make it a vector scorer."""

    name = "reward-model"
    summary = "a sequence-classification reward model's score (or k attribute scores) of prompt + completion"
    outputs = ("reward",)
    Config = RewardModelConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.config
        if config.names is not None:
            self.outputs = tuple(config.names)
        elif isinstance(config.label, list):
            self.outputs = tuple(f"label_{i}" for i in config.label)

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
                out.append(model(**enc).logits[:, self.config.labels].double().cpu())
        return torch.cat(out)  # [N, labels]


def _conversation(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt + completion as one text: the chat template's when the data are messages, else concatenated."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]) + (
        completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}])
    return tokenizer.apply_chat_template(messages, tokenize=False)


# -- rule scorers (cheap, deterministic: tests, toy tasks, verifiable rewards) ---------------------------------------


class KeywordConfig(MethodConfig):
    keyword: str = Field(description="the text to look for")
    count: bool = Field(False, description="the number of occurrences (else 1.0 when present, 0.0 when not)")
    case_sensitive: bool = Field(False, description="match case")


class Keyword(Scorer):
    """1.0 when the completion contains ``keyword`` (or the number of occurrences with ``count``)."""

    name = "keyword"
    summary = "1 if the completion contains a keyword (or its number of occurrences)"
    outputs = ("keyword",)
    Config = KeywordConfig

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        flags = 0 if self.config.case_sensitive else re.IGNORECASE
        return _matches(re.compile(re.escape(self.config.keyword), flags), completions, self.config.count)


class RegexConfig(MethodConfig):
    pattern: str = Field(description="a Python regular expression")
    count: bool = Field(False, description="the number of matches (else 1.0 when it matches anywhere)")


class Regex(Scorer):
    """1.0 when the completion matches ``pattern`` anywhere (or the number of matches with ``count``)."""

    name = "regex"
    summary = "1 if the completion matches a regular expression (or its number of matches)"
    outputs = ("regex",)
    Config = RegexConfig

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        try:
            pattern = re.compile(self.config.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.config.pattern!r}: {exc}") from None
        return _matches(pattern, completions, self.config.count)


def _matches(pattern: re.Pattern, completions: list, count: bool) -> Any:
    """``[N, 1]``: the number of non-overlapping matches per completion (``count``), else 1.0 / 0.0 for any."""
    import torch

    found = [len(pattern.findall(_text(c))) for c in completions]
    values = found if count else [float(n > 0) for n in found]
    return torch.tensor(values, dtype=torch.float64).unsqueeze(-1)


class Digits(Scorer):
    """The number of digit characters in the completion (a toy reward the tiny model learns in a few steps)."""

    name = "digits"
    summary = "the number of digits in the completion (a toy reward for tests)"
    outputs = ("digits",)

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        import torch

        return torch.tensor([sum(ch.isdigit() for ch in _text(c)) for c in completions],
                            dtype=torch.float64).unsqueeze(-1)  # fmt: skip


class ExactAnswerConfig(MethodConfig):
    column: str = Field("answer", description="the data column holding the reference answer")
    match: Literal["exact", "contains", "last-number"] = Field(
        "contains", description="exact: the stripped completion equals the answer; contains: the answer appears in it; "
        "last-number: the completion's last number equals the answer's")


class ExactAnswer(Scorer):
    """A verifier: 1.0 when the completion gives the row's ``answer`` (exact, contained, or as its last number),
    else 0.0."""

    name = "exact-answer"
    summary = "1 if the completion gives the data's answer column (exact, contained or last number)"
    outputs = ("correct",)
    Config = ExactAnswerConfig

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]  (the configured column)
        return (self.config.column,)

    def score(self, prompts: list, completions: list, **columns: list) -> Any:
        import torch

        if self.config.column not in columns:
            raise ValueError(f"needs the data column {self.config.column!r} (the reference answers)")
        answers = [str(a).strip() for a in columns[self.config.column]]
        values = []
        for completion, answer in zip(completions, answers):
            text = _text(completion).strip()
            if self.config.match == "exact":
                values.append(float(text == answer))
            elif self.config.match == "contains":
                values.append(float(answer in text))
            else:
                numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
                values.append(float(bool(numbers) and numbers[-1] == answer))
        return torch.tensor(values, dtype=torch.float64).unsqueeze(-1)



# -- image scorers (diffusion runs) ---------------------------------------------------------------------------------
class Brightness(Scorer):
    """The image's mean pixel value in [0, 1] (all channels): a rule reward online diffusion tests learn."""

    name = "brightness"
    summary = "an image's mean pixel value in [0, 1] (a rule reward for diffusion tests)"
    outputs = ("brightness",)
    inputs = "pixels"

    def score(self, prompts: list, completions: Any, **columns: list) -> Any:
        return completions.flatten(1).double().mean(1).unsqueeze(-1)


class InkConfig(MethodConfig):
    threshold: float = Field(0.5, ge=0, le=1, description="a pixel is inked when its value (in [0, 1]) exceeds this")


class Ink(Scorer):
    """The share of inked pixels (value above ``threshold``, channels averaged): the digits quickstart's rule as a
    count of strokes rather than their mean brightness."""

    name = "ink"
    summary = "the share of pixels above a threshold (strokes of grey digits; default 0.5)"
    outputs = ("ink",)
    inputs = "pixels"
    Config = InkConfig

    def score(self, prompts: list, completions: Any, **columns: list) -> Any:
        grey = completions.double().mean(1)
        return (grey > self.config.threshold).double().flatten(1).mean(1).unsqueeze(-1)


class LatentMean(Scorer):
    """The mean latent value, differentiable (no decoding): a latent reward for guidance tests (``reward_guidance``)
    and for online runs without a VAE decode."""

    name = "latent-mean"
    summary = "the mean latent value (differentiable; a latent reward for guidance and tests)"
    outputs = ("latent_mean",)
    inputs = "latents"

    def score(self, prompts: list, completions: Any, **columns: list) -> Any:
        return completions.flatten(1).mean(1, keepdim=True)

SCORERS = (Length, ImplicitReward, RewardModel, Keyword, Regex, Digits, ExactAnswer, Brightness, Ink, LatentMean)
