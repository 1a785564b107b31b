"""SRPO — Self-Improving Robust Preference Optimization (Choi et al., arXiv 2406.01660, ICLR 2025).

One model is trained both as a generator (prompt P0(x)) and as an in-context reviser (prompt P1(x, y′) holding a
previous completion y′). Per triplet (x, y_w, y_l) the collator builds K = 6 sequences, prompts masked:

    0: y_w | P0(x)      1: y_l | P0(x)
    2: y_w | P1(x, y_l) 3: y_l | P1(x, y_l)      4: y_w | P1(x, y_w)  5: y_l | P1(x, y_w)

With token-sum log-ratios r_k = ℓθ(seq k) − ℓref(seq k) (reference without gradient), as in the loss of the
community implementation submitted to TRL (huggingface/trl PR #1772; no official code):

    S = (1/2 − β (r_2 − r_3))² + (1/2 − β (r_4 − r_5))²          (self-improvement: revise towards y_w)
    G = (β (r_2 + r_0 − r_5 − r_1) − 1)²                          (generative)
    L = mean over pairs of (1 − α) G + α S

Both terms are IPO-style squared losses: L = 0 when β(r_2 − r_3) = β(r_4 − r_5) = 1/2 and
β(r_2 + r_0 − r_5 − r_1) = 1. At initialisation (all r = 0) L = (1 − α) + α/2.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, hookimpl

#: Which of the three prompts (P0(x), P1(x, y_l), P1(x, y_w)) and which completion (y_w, y_l) each sequence has.
SEQUENCES = (("generate", "chosen"), ("generate", "rejected"), ("revise_rejected", "chosen"),
             ("revise_rejected", "rejected"), ("revise_chosen", "chosen"), ("revise_chosen", "rejected"))  # fmt: skip
PROMPTS = ("generate", "revise_rejected", "revise_chosen")

# The PR's TL;DR example script (examples/scripts/srpo/srpo_tldr.py) at commit 2dac9d5 (2024-07-08) sets
# prefix_zero_prompt, prefix_n_prompt and post_revision_prompt; its trainer builds  prefix + "\n" + x + post  and
# prefix_n + "\n" + x + "EXAMPLE SUMMARY: " + y′ + "\n\n" + post.  The same strings as templates (later commits of
# the PR render the prompts with a chat template of slightly different wording instead):
PR_GENERATION_TEMPLATE = (
    "Below is a reddit POST and the corresponding SUBREDDIT and TITLE.\n"
    "Write a both precise and concise summary of the contents of the POST.\n{prompt}TL;DR:"
)
PR_REVISION_TEMPLATE = (
    "Below is a reddit POST and the corresponding SUBREDDIT, TITLE, and an EXAMPLE\n"
    "SUMMARY. Write a both precise and concise summary of the contents of the POST.\n"
    "{prompt}EXAMPLE SUMMARY: {completion}\n\nTL;DR:"
)


class SRPOConfig(MethodConfig):
    """SRPO hyperparameters (defaults: TRL PR #1772, the only implementation; the paper's values are not known)."""

    beta: float = Field(0.01, gt=0, description="β, regularisation of the squared losses (PR trainer default: 0.01)")
    alpha: float = Field(
        0.8, ge=0, le=1, description="α, weight of the self-improvement loss S vs the generative loss G (PR: 0.8)"
    )
    generation_template: str = Field(
        PR_GENERATION_TEMPLATE,
        description="P0(x): the generation prompt, a format string with {prompt} (PR: its TL;DR wording; "
        "'{prompt}' trains the plain prompt)",
    )
    revision_template: str = Field(
        PR_REVISION_TEMPLATE,
        description="P1(x, y′): the revision prompt, a format string with {prompt} and {completion} (the previous "
        "answer; PR: its TL;DR wording)",
    )

    @field_validator("generation_template", "revision_template")
    @classmethod
    def _fields_present(cls, template: str, info) -> str:
        names = {"prompt"} if info.field_name == "generation_template" else {"prompt", "completion"}
        try:
            template.format(**{name: "" for name in names})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must be a format string using only {sorted(names)}: {exc!r}") from None
        missing = [name for name in sorted(names) if "{" + name + "}" not in template]
        if missing:
            raise ValueError(f"must contain {', '.join('{' + n + '}' for n in missing)}")
        return template


def SRPOCollator(pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):  # noqa: N802
    """The core's :class:`~trl_plus.SequencesCollator` building ``[6*B, L]``, sequence-major in the order
    of :data:`SEQUENCES`: each sequence is its prompt's ids plus its completion's ids (EOS included), prompt masked."""
    from trl_plus import SequencesCollator, prompt_completion

    def sequences(example):
        prompts, completions = example["srpo_prompt_ids"], example["srpo_completion_ids"]
        return [prompt_completion(prompts[PROMPTS.index(p)], completions[k]) for k, (p, _) in enumerate(SEQUENCES)]

    names = tuple(f"{completion} ({prompt})" for prompt, completion in SEQUENCES)
    return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=names)


def srpo_losses(ratios, beta: float, alpha: float):
    """Per-pair ``(loss, S, G)`` (each ``[B]``) from the ``[6, B]`` log-ratios ``r`` ordered as :data:`SEQUENCES`."""
    r_w, r_l, r_w_given_l, r_l_given_l, r_w_given_w, r_l_given_w = ratios
    self_improvement = (0.5 - beta * (r_w_given_l - r_l_given_l)) ** 2 + (0.5 - beta * (r_w_given_w - r_l_given_w)) ** 2
    generative = (beta * (r_w_given_l + r_w - r_l_given_w - r_l) - 1) ** 2
    return (1 - alpha) * generative + alpha * self_improvement, self_improvement, generative


class SRPO(Method):
    """Joint generator + self-reviser trained with IPO-style squared losses on six sequences per triplet."""

    name = "srpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "learning.objective": "self-play",
                "constraint.reference": "fixed", "property": "distribution-shift", "scope": "text",
                "survey": ("self-play", "distribution-shift"), "source": "survey"}
    paper = Paper("Self-Improving Robust Preference Optimization", "2406.01660")
    summary = "generator + in-context self-reviser, IPO-style squared losses on 6 sequences per pair"
    needs = Needs(reference="yes")
    Config = SRPOConfig
    sequences_per_example = 6
    tokenized_columns = ("srpo_prompt_ids", "srpo_completion_ids")

    def tokenize(self, example: dict[str, Any], tokenizer) -> dict[str, list]:
        """Render P0(x), P1(x, y_l), P1(x, y_w) and tokenize the six (prompt, completion) sequences as TRL's
        DPOTrainer tokenizes a pair (EOS appended to each completion). Plain-text rows only."""
        from trl_plus import tokenize_completions

        x, y_w, y_l = example["prompt"], example["chosen"], example["rejected"]
        if not all(isinstance(v, str) for v in (x, y_w, y_l)):
            raise TypeError(
                "srpo builds its revision prompts from plain text: prompt, chosen and rejected must be strings, not "
                "chat messages (apply the chat template to the data first)"
            )
        config = self.config
        prompts = {
            "generate": config.generation_template.format(prompt=x),
            "revise_rejected": config.revision_template.format(prompt=x, completion=y_l),
            "revise_chosen": config.revision_template.format(prompt=x, completion=y_w),
        }
        prompt_ids, completion_ids = [], {}
        for name in PROMPTS:
            ids = tokenize_completions(tokenizer, prompts[name], {"chosen": y_w, "rejected": y_l})
            prompt_ids.append(ids["prompt_ids"])
            completion_ids[name] = ids
        return {
            "srpo_prompt_ids": prompt_ids,
            "srpo_completion_ids": [completion_ids[p][c] for p, c in SEQUENCES],
        }

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """An :class:`SRPOCollator`: six sequences per example."""
        return SRPOCollator(pad_token_id, max_length, truncation_mode)

    def loss(self, ctx: LossContext) -> LossOutput:
        """``mean((1 − α) G + α S)``; rewards ``β r`` (rows 0/1: the generation log-ratios of y_w and y_l)."""
        beta = self.config.beta
        ratios = ctx.logps() - ctx.ref_logps()
        losses, self_improvement, generative = srpo_losses(ratios, beta, self.config.alpha)
        r = ratios.detach()
        metrics = {
            "srpo/self_improvement_loss": self_improvement.detach().mean(),
            "srpo/generative_loss": generative.detach().mean(),
            "srpo/revision_margin_given_rejected": (beta * (r[2] - r[3])).mean(),
            "srpo/revision_margin_given_chosen": (beta * (r[4] - r[5])).mean(),
        }
        return LossOutput(loss=losses.mean(), rewards=beta * r, metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``srpo``."""
    register(SRPO)
