"""r-to-Q* — From r to Q*: Your Language Model is Secretly a Q-Function (2024, arXiv 2404.12358; official code not
found).

In the token MDP (state s_t = (x, y_<t), action y_t) a DPO policy's log-ratio to its reference is a per-token reward
— DPO's credit assignment. Per response token t:

    c_t = β·(log πθ(y_t|s_t) − log πref(y_t|s_t)),      Σ_t c_t = β·(ℓθ(y|x) − ℓref(y|x)) = DPO's implicit reward

(equal to the true token reward up to a potential-based shaping term that telescopes along a response). This metric
writes every response token's credit as a CSV and an HTML heat map per response (tokens coloured by c_t), and
summarises the implicit rewards and the share of tokens with positive credit.
"""

from __future__ import annotations

import csv
import html
import itertools
from typing import Any

from pydantic import Field

from trl_plus import LossContext, MethodConfig, Metric, Needs, Paper, hookimpl

SIDES = ("chosen", "rejected")


class RToQConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="β of c_t = β·(log πθ − log πref): the evaluated DPO run's β (only "
                                               "scales the credits; DPO's default 0.1)")  # fmt: skip
    clip_quantile: float = Field(0.98, gt=0, le=1, description="the heat map's colour scale is ±(this quantile of "
                                                               "|c_t| over all tokens shown); larger |c_t| saturate "
                                                               "(our choice: the paper gives none)")  # fmt: skip
    max_html_examples: int | None = Field(100, ge=1, description="examples drawn in the HTML heat map (the first "
                                                                 "ones; None: all); the CSV has every example")


def token_credits(ctx: LossContext, beta: float) -> Any:
    """``[K, B, T]`` c_t = β·(log πθ − log πref) on the scored (response) tokens, 0 elsewhere (float64)."""
    if ctx.ref_token_logps is None:
        raise RuntimeError("r-to-q needs the reference's log-probs: run it with a reference (reference.mode)")
    mask = ctx.mask.double()
    return beta * (ctx.token_logps.double() - ctx.ref_token_logps.double()) * mask


class RToQ(Metric):
    """Per-token credit c_t = β(log πθ − log πref) of a DPO policy on the response tokens of each pair: a CSV, an HTML
    heat map, and the implicit rewards Σ_t c_t."""

    name = "r-to-q"
    summary = "per-token credit β(log πθ − log πref) as a CSV and an HTML heat map; Σ c_t = the implicit reward"
    paper = Paper("From r to Q*: Your Language Model is Secretly a Q-Function", "2404.12358")
    needs = Needs(reference="yes")
    Config = RToQConfig

    def batch(self, ctx: LossContext) -> dict[str, Any]:
        credits = token_credits(ctx, self.config.beta)
        where = ctx.mask.bool()
        mask = ctx.mask.double()  # the sequence sums β(ℓθ − ℓref), in float64
        rewards = self.config.beta * ((ctx.token_logps.double() * mask).sum(-1) - (ctx.ref_token_logps.double() * mask).sum(-1))
        values: dict[str, Any] = {"reward": rewards.T}
        for k, side in enumerate(SIDES):
            rows = range(ctx.batch_size)
            values[f"credit_{side}"] = [credits[k, b][where[k, b]] for b in rows]
            values[f"logp_{side}"] = [ctx.token_logps[k, b][where[k, b]].double() for b in rows]
            values[f"ref_logp_{side}"] = [ctx.ref_token_logps[k, b][where[k, b]].double() for b in rows]
            if ctx.labels is not None:
                values[f"token_{side}"] = [ctx.labels[k, b][where[k, b]] for b in rows]
        return values

    def summarize(self, values) -> dict[str, float]:
        import torch

        rewards = torch.stack(values["reward"])
        out = {"pairs": float(len(rewards)), "reward_margin": (rewards[:, 0] - rewards[:, 1]).mean().item(),
               "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).double().mean().item()}  # fmt: skip
        for k, side in enumerate(SIDES):
            credits = torch.cat(values[f"credit_{side}"])
            out[f"reward/{side}"] = rewards[:, k].mean().item()
            out[f"positive_share/{side}"] = (credits > 0).double().mean().item()
            out[f"mean_credit/{side}"] = credits.mean().item()
            out[f"min_credit/{side}"] = credits.min().item()
            out[f"max_credit/{side}"] = credits.max().item()
            out[f"tokens/{side}"] = float(len(credits))
        return out

    # -- artefacts -------------------------------------------------------------------------------------------
    def _token_text(self, ids: Any, n: int) -> list[str]:
        if ids is None:
            return [""] * n
        if self.tokenizer is None:
            return [str(i) for i in ids.tolist()]
        return [self.tokenizer.decode([i]) for i in ids.tolist()]

    def _responses(self, values):
        """Per example and side: (row index, side, token ids, texts, log-probs, reference log-probs, credits)."""
        for i, index in enumerate(values["index"]):
            for side in SIDES:
                credits = values[f"credit_{side}"][i]
                ids = values[f"token_{side}"][i] if f"token_{side}" in values else None
                yield (int(index), side, ids, self._token_text(ids, len(credits)), values[f"logp_{side}"][i],
                       values[f"ref_logp_{side}"][i], credits)  # fmt: skip

    def artefacts(self, values, out_dir) -> list[Any]:
        """``credits.csv`` (one row per response token: example row index, side, position in the response, token id
        and text, log πθ, log πref, c_t and the cumulative C_t) and ``credits.html`` (the heat map)."""
        csv_path, html_path = out_dir / "credits.csv", out_dir / "credits.html"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["example", "side", "position", "token_id", "token", "logp", "ref_logp", "credit",
                             "cumulative_credit"])  # fmt: skip
            for index, side, ids, texts, logps, refs, credits in self._responses(values):
                cumulative = credits.cumsum(0).tolist()
                ids = [-1] * len(credits) if ids is None else ids.tolist()
                for t, (credit, text) in enumerate(zip(credits.tolist(), texts)):
                    writer.writerow([index, side, t, ids[t], text, logps[t].item(), refs[t].item(), credit,
                                     cumulative[t]])  # fmt: skip
        html_path.write_text(self.heat_map(values), encoding="utf-8")
        return [csv_path, html_path]

    def heat_map(self, values) -> str:
        """The HTML page: per example its prompt, then each response's tokens on a background coloured by c_t
        (blue positive, red negative, white 0; the scale symmetric, clipped at ``clip_quantile`` of |c_t|), the
        exact values in each token's tooltip, and a legend."""
        import torch

        shown = len(values["index"]) if self.config.max_html_examples is None else self.config.max_html_examples
        responses = list(itertools.islice(self._responses(values), 2 * shown))
        magnitudes = torch.cat([r[-1].abs() for r in responses]) if responses else torch.zeros(1)
        scale = magnitudes.quantile(self.config.clip_quantile).item() if magnitudes.numel() else 0.0
        scale = scale if scale > 0 else 1.0
        parts = [_HEAD.format(beta=self.config.beta, scale=scale, q=self.config.clip_quantile,
                              stops=f"{_colour(-scale, scale)}, #ffffff, {_colour(scale, scale)}")]  # fmt: skip
        for n, (index, side, _, texts, logps, refs, credits) in enumerate(responses):
            if side == SIDES[0]:
                parts.append(f'<section class="example" data-example="{index}"><h2>example {index}</h2>')
                prompt = self._prompt(index)
                if prompt is not None:
                    parts.append(f'<div class="prompt"><b>prompt</b> {html.escape(prompt)}</div>')
            total = credits.sum().item()
            parts.append(f'<div class="response" data-example="{index}" data-side="{side}"><div class="label">'
                         f'{side}: Σ c_t = {total:+.4f}, {len(credits)} tokens</div><div class="tokens">')  # fmt: skip
            for text, credit, logp, ref in zip(texts, credits.tolist(), logps.tolist(), refs.tolist()):
                tip = f"c = {credit:+.5f}  log πθ = {logp:.4f}  log πref = {ref:.4f}"
                ink = "color:#fff;" if abs(credit) > 0.6 * scale else ""  # legible on the dark ends of the scale
                parts.append(f'<span class="tok" style="{ink}background:{_colour(credit, scale)}" title="{tip}" '
                             f'data-credit="{credit:.8g}">{html.escape(text)}</span>')  # fmt: skip
            parts.append("</div></div>")
            if side == SIDES[-1]:
                parts.append("</section>")
        parts.append("</body></html>\n")
        return "".join(parts)

    def _prompt(self, index: int) -> str | None:
        if self.data is None or "prompt" not in getattr(self.data, "column_names", ()):
            return None
        prompt = self.data[index]["prompt"]
        if isinstance(prompt, list):  # chat messages
            return " | ".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
        return str(prompt)


def _colour(credit: float, scale: float) -> str:
    """A diverging colour: white at 0, blue (#2166ac) at +scale, red (#b2182b) at −scale, saturated beyond."""
    strength = min(abs(credit) / scale, 1.0)
    end = (33, 102, 172) if credit > 0 else (178, 24, 43)
    r, g, b = (round(255 + (e - 255) * strength) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"


_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>r-to-q: per-token credit</title><style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 60em; }}
.legend {{ display: flex; align-items: center; gap: .6em; margin: .5em 0 1.5em; }}
.bar {{ width: 18em; height: 1em; border: 1px solid #999; background: linear-gradient(to right, {stops}); }}
.example {{ border-top: 1px solid #ccc; padding: .4em 0; }}
.example h2 {{ font-size: 1em; margin: .2em 0; }}
.prompt {{ color: #555; margin: .2em 0 .4em; white-space: pre-wrap; }}
.label {{ font-size: .85em; color: #333; margin-top: .3em; }}
.tokens {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; }}
.tok {{ padding: 1px 0; border-right: 1px solid #eee; }}
</style></head><body>
<h1>Per-token credit c<sub>t</sub> = β·(log π<sub>θ</sub> − log π<sub>ref</sub>)</h1>
<p>β = {beta:g}. Each response token is coloured by its credit (DPO's implicit per-token reward); hover for the
values. The credits of a response sum to its implicit reward. Prompt tokens carry no credit.</p>
<div class="legend"><span>{neg}</span><div class="bar"></div><span>{pos}</span>
<span>(red: the policy lowered the token's probability against the reference; blue: raised it; saturated beyond
±{scale:.3g}, the {q:g} quantile of |c<sub>t</sub>|)</span></div>
""".replace("{neg}", "−{scale:.3g}").replace("{pos}", "+{scale:.3g}")


@hookimpl
def register_metrics(register):
    register(RToQ)
