"""DPORM vs EXRM — On the Limited Generalization Capability of the Implicit Reward Model Induced by Direct Preference
Optimization (EMNLP 2024, arXiv 2409.03650; official code not found).

How well does DPO's implicit reward model (DPORM) rank held-out pairs, compared with an explicit Bradley–Terry reward
model (EXRM) trained on the same preferences, in distribution and under distribution shift? Per pair:

    r_DPO(x, y) = β·(ℓθ(y|x) − ℓref(y|x))         (ℓ = summed completion log-probs; β only scales)
    r_EX(x, y)  = the reward model's scalar output on prompt + completion
    Acc(r)      = mean 1[r(x, y_w) > r(x, y_l)]    (strict: a tie counts wrong, as TRL's rewards/accuracies)

The metric runner calls the metric once per named evaluation set (``data.eval: {id: ..., prompt_shift: ...}``), so
each set gets its own DPORM and EXRM accuracies (``eval_<set>_dporm-generalization/<key>``).
"""

from __future__ import annotations

import csv
from typing import Any

from pydantic import Field

from trl_plus import LossContext, MethodConfig, Metric, Needs, Paper, get_registry, hookimpl, pair_accuracy


class DPORMConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="β of the implicit reward β·(ℓθ − ℓref): scales rewards and margins, "
                                               "never the accuracy (the evaluated run's β; DPO's default 0.1)")  # fmt: skip
    reward_model: str | None = Field(None, description="the explicit reward model (EXRM): a sequence-classification "
                                                       "model folder or hub id, scored by the `reward-model` scorer; "
                                                       "None: DPORM figures only")  # fmt: skip
    label: int = Field(0, ge=0, description="which output of the reward model is the reward (num_labels > 1)")
    batch_size: int = Field(8, ge=1, description="completions per reward-model forward pass")
    max_length: int | None = Field(None, ge=1, description="reward-model tokens kept per sequence (None: all)")


def strict_accuracy(chosen: Any, rejected: Any) -> tuple[float, float]:
    """``(accuracy, tie share)`` of scores ``chosen`` > ``rejected`` ``[N]``: strict, a tie counts wrong."""
    return (pair_accuracy(chosen, rejected, ties="lose").double().mean().item(),
            (chosen == rejected).double().mean().item())  # fmt: skip


def _text(row: dict, key: str) -> Any:
    return row.get(key, "") if key == "prompt" else row[key]


class DPORMGeneralization(Metric):
    """DPO implicit-reward accuracy (strict >) vs an explicit reward model's on the same pairs, per evaluation set."""

    name = "dporm-generalization"
    summary = "DPO implicit-reward accuracy (strict >) vs an explicit reward model's, per named eval set"
    paper = Paper("On the Limited Generalization Capability of the Implicit Reward Model Induced by Direct Preference "
                  "Optimization", "2409.03650")  # fmt: skip
    needs = Needs(reference="yes")
    Config = DPORMConfig

    def batch(self, ctx: LossContext) -> dict[str, Any]:
        ratios = (ctx.logps() - ctx.ref_logps()).double()  # [2, B]
        rewards = self.config.beta * ratios
        self._device = ctx.token_logps.device
        return {"rewards": rewards.T, "normalized_rewards": (rewards / ctx.lengths.double().clamp(min=1)).T}

    def exrm_scores(self, indices: list[int]) -> Any:
        """``[N, 2]`` the reward model's scores of (chosen, rejected) for the evaluated rows ``indices``."""
        import torch

        config = self.config
        scorer = get_registry().get_scorer("reward-model")(
            {"model": config.reward_model, "label": config.label, "batch_size": config.batch_size,
             "max_length": config.max_length}, tokenizer=self.tokenizer, device=getattr(self, "_device", None))  # fmt: skip
        rows = [self.data[i] for i in indices]
        prompts = [_text(row, "prompt") for row in rows]
        scores = scorer.score(prompts * 2, [row["chosen"] for row in rows] + [row["rejected"] for row in rows])
        return torch.stack(scores[:, 0].double().split(len(rows)), dim=1)

    def summarize(self, values) -> dict[str, float]:
        import torch

        rewards, normalized = torch.stack(values["rewards"]), torch.stack(values["normalized_rewards"])
        out = {"pairs": float(len(rewards))}
        out["dporm_accuracy"], out["dporm_ties"] = strict_accuracy(rewards[:, 0], rewards[:, 1])
        out["dporm_normalized_accuracy"], _ = strict_accuracy(normalized[:, 0], normalized[:, 1])
        out["reward_margin"] = (rewards[:, 0] - rewards[:, 1]).mean().item()
        out["rewards/chosen"], out["rewards/rejected"] = rewards.mean(0).tolist()
        self._exrm = None
        if self.config.reward_model is not None:
            self._exrm = scores = self.exrm_scores([int(i) for i in values["index"]])
            out["exrm_accuracy"], out["exrm_ties"] = strict_accuracy(scores[:, 0], scores[:, 1])
            out["exrm_margin"] = (scores[:, 0] - scores[:, 1]).mean().item()
            out["accuracy_gap"] = out["exrm_accuracy"] - out["dporm_accuracy"]  # EXRM − DPORM on this set
        return out

    def artefacts(self, values, out_dir) -> list[Any]:
        """``pairs.csv``: per pair its row index, the implicit rewards of both sides (and the reward model's scores)
        and whether each model ranks it right (strict)."""
        path = out_dir / "pairs.csv"
        exrm = getattr(self, "_exrm", None)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "dporm_chosen", "dporm_rejected", "dporm_correct"]
                            + (["exrm_chosen", "exrm_rejected", "exrm_correct"] if exrm is not None else []))  # fmt: skip
            for i, index in enumerate(values["index"]):
                chosen, rejected = values["rewards"][i].tolist()
                row = [int(index), chosen, rejected, int(chosen > rejected)]
                if exrm is not None:
                    row += [exrm[i, 0].item(), exrm[i, 1].item(), int(exrm[i, 0] > exrm[i, 1])]
                writer.writerow(row)
        return [path]


@hookimpl
def register_metrics(register):
    register(DPORMGeneralization)
