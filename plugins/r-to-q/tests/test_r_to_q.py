"""r-to-q: the card's credit example, Σ_t c_t = the sequence implicit reward through the trainer (1e-6), one CSV row
per response token and none for the prompt, and the HTML heat map holding every response's tokens."""

from __future__ import annotations

import csv
from html.parser import HTMLParser

import pytest
import torch
from trl_plus_r_to_q import RToQ

from trl_plus import tokenize_completions
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    make_context,
    perturb,
    preference_rows,
    run_metric,
    tiny_trainer,
)


def gathered(metric, ctx):
    values: dict[str, list] = {}
    for key, value in metric.batch(ctx).items():
        values[key] = list(value)
    values["index"] = [torch.tensor(i) for i in range(ctx.batch_size)]
    return values


def test_card_worked_example(tmp_path):
    """β = 0.1: log πθ = [−0.2, −1.5, −0.7, −0.1], log πref = [−0.4, −1.0, −0.9, −0.1] → c = [0.02, −0.05, 0.02, 0],
    C = [0.02, −0.03, −0.01, −0.01], implicit reward −0.01."""
    policy = [[[-0.2, -1.5, -0.7, -0.1]], [[-1.0]]]
    ref = [[[-0.4, -1.0, -0.9, -0.1]], [[-1.0]]]
    metric = RToQ(beta=0.1)
    values = gathered(metric, make_context(policy, ref, requires_grad=False))
    assert values["credit_chosen"][0].tolist() == pytest.approx([0.02, -0.05, 0.02, 0.0], abs=1e-12)
    assert values["reward"][0][0].item() == pytest.approx(-0.01, abs=1e-12)
    metric.artefacts(values, tmp_path)
    rows = [r for r in csv.DictReader((tmp_path / "credits.csv").open()) if r["side"] == "chosen"]
    assert [float(r["cumulative_credit"]) for r in rows] == pytest.approx([0.02, -0.03, -0.01, -0.01], abs=1e-12)
    assert metric.summarize(values)["positive_share/chosen"] == 0.5


def test_policy_equal_to_reference_and_padding():
    """πθ = πref → every c_t = 0; an example's credits do not change with the padding its batch adds."""
    tokens = [[-0.5, -2.0, -0.1], [-1.0, -0.3]]
    zero = gathered(RToQ(), make_context([tokens[:1], tokens[1:]], [tokens[:1], tokens[1:]], requires_grad=False))
    assert torch.cat(zero["credit_chosen"] + zero["credit_rejected"]).abs().max() == 0
    alone = gathered(RToQ(), make_context([[[-0.5, -2.0]], [[-1.0]]], [[[-0.4, -2.5]], [[-1.5]]], requires_grad=False))
    padded = gathered(RToQ(), make_context([[[-0.5, -2.0], [-1.0] * 9], [[-1.0], [-0.2] * 7]],
                                           [[[-0.4, -2.5], [-0.9] * 9], [[-1.5], [-0.1] * 7]], requires_grad=False))
    assert torch.equal(alone["credit_chosen"][0], padded["credit_chosen"][0])
    assert torch.equal(alone["credit_rejected"][0], padded["credit_rejected"][0])


class Spans(HTMLParser):
    """The token texts of each response of the heat map: {(example, side): [texts]}."""

    def __init__(self):
        super().__init__()
        self.responses, self.current, self.in_token = {}, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-side" in attrs:
            self.current = (int(attrs["data-example"]), attrs["data-side"])
            self.responses[self.current] = []
        elif tag == "span" and attrs.get("class") == "tok":
            self.in_token = True
            self.responses[self.current].append("")

    def handle_endtag(self, tag):
        self.in_token = False if tag == "span" else self.in_token

    def handle_data(self, data):
        if self.in_token:
            self.responses[self.current][-1] += data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The metric on a tiny float64 trainer whose policy was perturbed away from its (deep-copied) reference."""
    tmp = tmp_path_factory.mktemp("r-to-q")
    rows = preference_rows(6, seed=5)
    model = build_model(build_tokenizer()).double()
    trainer = tiny_trainer("dpo", tmp / "run", max_steps=1, model=model, training={"per_device_eval_batch_size": 4})
    perturb(trainer.model, seed=1, scale=0.05)
    return rows, trainer, run_metric(RToQ(beta=0.1), trainer, rows, tmp / "out")


def sequence_logps(model, tokenizer, row):
    """ℓ(y|x) of both completions by a plain float64 forward of prompt + completion (tokenized as TRL does)."""
    ids = tokenize_completions(tokenizer, row["prompt"], {"chosen": row["chosen"], "rejected": row["rejected"]})
    out = []
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            prompt, completion = list(ids["prompt_ids"]), list(ids[side])
            logits = model(torch.tensor([prompt + completion])).logits[0].double()
            scored = logits[len(prompt) - 1 : -1].log_softmax(-1)
            out.append(scored.gather(-1, torch.tensor(completion)[:, None]).sum().item())
    return out


def test_credits_sum_to_the_sequence_implicit_reward(run):
    """Σ_t c_t over a response's tokens equals β(ℓθ − ℓref) of the whole sequence, computed here apart by a plain
    float64 forward of the policy and the reference, to 1e-6, on both sides."""
    rows, trainer, result = run
    tokenizer = trainer.processing_class
    implicit = torch.tensor([[0.1 * (p - r) for p, r in zip(sequence_logps(trainer.model, tokenizer, row),
                                                             sequence_logps(trainer.ref_model, tokenizer, row))]
                             for row in rows], dtype=torch.float64)  # fmt: skip
    sums = torch.stack([torch.stack([c.sum() for c in result.values[f"credit_{s}"]]) for s in ("chosen", "rejected")], 1)
    assert implicit.abs().min() > 1e-4  # the policy moved: the rewards are not 0
    assert torch.allclose(sums, implicit, atol=1e-6, rtol=0)
    assert torch.allclose(torch.stack(result.values["reward"]), sums, atol=1e-12, rtol=0)
    summary = result.summary
    assert summary["reward/chosen"] == pytest.approx(implicit[:, 0].mean().item(), abs=1e-6)
    assert 0 < summary["positive_share/chosen"] < 1


def test_one_csv_row_per_response_token_and_no_prompt_token(run):
    rows, trainer, result = run
    csv_path, _ = result.artefacts
    table = list(csv.DictReader(csv_path.open()))
    tokenizer = trainer.processing_class
    expected = 0
    for i, row in enumerate(rows):
        ids = tokenize_completions(tokenizer, row["prompt"], {"chosen": row["chosen"], "rejected": row["rejected"]})
        for side in ("chosen", "rejected"):
            mine = [r for r in table if int(r["example"]) == i and r["side"] == side]
            assert [int(r["token_id"]) for r in mine] == list(ids[side])  # the response's tokens, EOS included
            assert [int(r["position"]) for r in mine] == list(range(len(ids[side])))
            assert "".join(r["token"] for r in mine) == row[side] + tokenizer.eos_token  # no prompt token
            expected += len(ids[side])
    assert len(table) == expected == int(result.summary["tokens/chosen"] + result.summary["tokens/rejected"])


def test_the_html_heat_map_holds_every_responses_tokens(run):
    rows, _, result = run
    csv_path, html_path = result.artefacts
    table = list(csv.DictReader(csv_path.open()))
    parser = Spans()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert set(parser.responses) == {(i, s) for i in range(len(rows)) for s in ("chosen", "rejected")}
    for (i, side), texts in parser.responses.items():
        assert texts == [r["token"] for r in table if int(r["example"]) == i and r["side"] == side]
    page = html_path.read_text(encoding="utf-8")
    assert 'class="legend"' in page and all(row["prompt"] in page for row in rows)
