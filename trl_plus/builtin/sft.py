"""SFT — supervised fine-tuning: the negative log-likelihood of a completion given its prompt.

    L = − Σ_{i,t} m_{i,t} log πθ(y_{i,t} | x_i, y_{i,<t}) / Σ_{i,t} m_{i,t}

(the token mean over the batch, as TRL's ``SFTTrainer`` with ``completion_only_loss``). It is the first stage of
two-stage methods (REDI: SFT on correct traces, then REDI) and the ``sft`` term several methods add. Reference-free:
one policy forward per step, one sequence per example. Data: ``prompt`` and ``completion``; to train on the chosen
answers of a preference file, map the column in the recipe: ``data: {train: {path: ..., columns: {completion: chosen}}}``.
"""

from __future__ import annotations

from ..contract import LossContext, LossOutput, Method, MethodConfig, Needs, Paper


class SFTConfig(MethodConfig):
    """SFT has no hyperparameters of its own: learning rate, epochs and lengths live in ``training``."""


def tokenize_sft(example, tokenizer):
    """``prompt_ids`` and ``completion_ids`` of one ``prompt``/``completion`` row (TRL's DPO tokenization)."""
    from ..data.tokenize import tokenize_completions

    return tokenize_completions(tokenizer, example["prompt"], {"completion_ids": example["completion"]})


class SFT(Method):
    """Negative log-likelihood of the completion (token mean over the batch); no reference, one sequence."""

    name = "sft"
    taxonomy = {"data.feedback": (), "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": (), "scope": "text", "source": "inferred"}
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
        """One sequence per example: prompt + completion, the completion scored."""
        from ..data.collate import SequencesCollator, prompt_completion

        def sequences(example):
            return [prompt_completion(example["prompt_ids"], example["completion_ids"])]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=("completion",))

    def loss(self, ctx: LossContext) -> LossOutput:
        """Token-mean NLL over all completion tokens of the batch; logs ``sft/nll`` (the same value)."""
        nll = -(ctx.token_logps * ctx.mask).sum() / ctx.mask.sum().clamp(min=1)
        return LossOutput(loss=nll, metrics={"sft/nll": nll.detach()})
