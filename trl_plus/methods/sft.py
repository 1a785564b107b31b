"""SFT — supervised fine-tuning: the negative log-likelihood of a completion given its prompt.

    L = − Σ_{i,t} m_{i,t} log πθ(y_{i,t} | x_i, y_{i,<t}) / Σ_{i,t} m_{i,t}

(the token mean over the batch, as TRL's ``SFTTrainer`` with ``completion_only_loss``). It is the first stage of
two-stage methods (REDI: SFT on correct traces, then REDI) and the ``sft`` term several methods add. Reference-free:
one policy forward per step, one sequence per example. Data: ``prompt`` and ``completion``; to train on the chosen
answers of a preference file, map the column in the recipe: ``data: {train: {path: ..., columns: {completion: chosen}}}``.
"""

from __future__ import annotations

from ..method import LossContext, LossOutput, Method, MethodConfig, Needs, Paper


class SFTConfig(MethodConfig):
    """SFT has no hyperparameters of its own: learning rate, epochs and lengths live in ``training``."""


def _pad_right(sequences, value):
    from trl.trainer.utils import pad

    return pad(sequences, padding_value=value, padding_side="right")


class SFTCollator:
    """``[B, L]`` prompt + completion sequences, right-padded, with a completion mask; ``max_length`` truncates the
    end (``keep_start``) or the start (``keep_end``)."""

    def __init__(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        self.pad_token_id, self.max_length, self.truncation_mode = pad_token_id, max_length, truncation_mode

    def __call__(self, examples):
        import torch

        ids, completion = [], []
        for example in examples:
            seq = example["prompt_ids"] + example["completion_ids"]
            mask = [0] * len(example["prompt_ids"]) + [1] * len(example["completion_ids"])
            if self.max_length is not None and len(seq) > self.max_length:
                cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
                seq, mask = seq[cut], mask[cut]
            ids.append(torch.tensor(seq))
            completion.append(torch.tensor(mask))
        return {
            "input_ids": _pad_right(ids, self.pad_token_id),
            "attention_mask": _pad_right([torch.ones_like(i) for i in ids], 0),
            "completion_mask": _pad_right(completion, 0),
        }


def tokenize_sft(example, tokenizer):
    """``prompt_ids`` and ``completion_ids`` of one ``prompt``/``completion`` row (TRL's DPO tokenization)."""
    from ..data import tokenize_completions

    return tokenize_completions(tokenizer, example["prompt"], {"completion_ids": example["completion"]})


class SFT(Method):
    """Negative log-likelihood of the completion (token mean over the batch); no reference, one sequence."""

    name = "sft"
    family = "supervised"
    paper = Paper(
        "Training language models to follow instructions with human feedback (the SFT stage)", "2203.02155"
    )
    summary = "supervised fine-tuning: token-mean NLL of the completion (first stage of two-stage recipes)"
    needs = Needs(reference="no")
    Config = SFTConfig
    data_fields = ("prompt", "completion")
    sequences_per_example = 1
    example_data = {"path": "recipes/data/quickstart_prefs.jsonl", "columns": {"completion": "chosen"}}
    tokenize = staticmethod(tokenize_sft)
    tokenized_columns = ("prompt_ids", "completion_ids")

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        """:class:`SFTCollator`: one sequence per example."""
        return SFTCollator(pad_token_id, max_length, truncation_mode)

    def loss(self, ctx: LossContext) -> LossOutput:
        """Token-mean NLL over all completion tokens of the batch; logs ``sft/nll`` (the same value)."""
        nll = -(ctx.token_logps * ctx.mask).sum() / ctx.mask.sum().clamp(min=1)
        return LossOutput(loss=nll, metrics={"sft/nll": nll.detach()})
