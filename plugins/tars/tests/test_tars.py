"""TARS (text-only): the card's worked examples, the perturbation step, reductions to DPO, the FFT triplet term,
gradients, seeded reproducibility, real steps, the recipe and the errors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_tars import (
    TARS,
    _reference_hidden_states,
    frequency_triplet_loss,
    perturbation_probabilities,
    sample_positions,
    tokenize_tars,
    tokenizer_facts,
)

from trl_plus import DPO, TrlPlusError, resolve_reference_mode
from trl_plus.testing import (
    build_tokenizer,
    make_context,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    train_tiny,
)

ROOT = Path(__file__).resolve().parents[3]

# Card worked example: sequence log-prob sums of the perturbed responses (true image), β = 0.1.
CARD_POLICY, CARD_REFERENCE = [[[-30.0]], [[-34.0]]], [[[-31.0]], [[-33.5]]]
Z_PW = [[0.1, 0.2], [0.3, -0.1], [0.0, 0.4], [0.2, 0.2]]
Z_CW = [[0.1, 0.1], [0.3, 0.0], [0.1, 0.4], [0.2, 0.1]]
Z_CR = [[0.5, -0.2], [-0.3, 0.1], [0.2, 0.0], [0.1, 0.3]]
INFO = {"vocab_size": 50, "mask_id": 1, "special_ids": [0, 2, 3]}  # pad 0, BOS 2, EOS 3


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_card_worked_example_preference_term():
    out = TARS(beta=0.1, beta_fre=0).loss(make_context(CARD_POLICY, CARD_REFERENCE))
    assert out.loss.item() == pytest.approx(0.6209570, abs=1e-7)


def test_card_worked_example_fft_triplet():
    assert frequency_triplet_loss(t(Z_PW), t(Z_CW), t(Z_CR), 0.5).item() == pytest.approx(0.4072657, abs=1e-6)
    # pos − neg = 0.00592016 − 0.0986545 = −0.0927343: margin 0.1 leaves 0.0072657, margin 0 clips to 0
    assert frequency_triplet_loss(t(Z_PW), t(Z_CW), t(Z_CR), 0.1).item() == pytest.approx(0.0072657, abs=1e-6)
    assert frequency_triplet_loss(t(Z_PW), t(Z_CW), t(Z_CR), 0.0).item() == 0.0
    # through the loss: L_pref + β_fre L_freq (the card's 1.3156306 also holds L_img = 0.6539470, image-only)
    ctx = make_context(CARD_POLICY, CARD_REFERENCE, outputs=SimpleNamespace(hidden_states=[t([Z_PW, Z_PW])]),
                       batch={"tars_ref_hidden": t([[Z_CW], [Z_CR]])})  # fmt: skip
    out = TARS(beta=0.1, beta_fre=0.1).loss(ctx)
    assert out.metrics["tars/freq_loss"].item() == pytest.approx(0.4072657, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.6209570 + 0.1 * 0.4072657, abs=1e-6)
    assert out.loss.item() + 0.6539470 == pytest.approx(1.3156306, abs=1e-6)


def test_card_perturbation_probabilities():
    # float64 in, float64 out (the function keeps the dtype): the card's 7-digit values, and the exact fractions
    probs = perturbation_probabilities(t([[0.9, 0.2, 0.5, 1.0]]), torch.ones(1, 4, dtype=torch.float64))
    assert probs.dtype == torch.float64
    assert probs[0].tolist() == pytest.approx([0.0714286, 0.5714286, 0.3571429, 0.0], abs=1e-7)  # card rounding
    assert probs[0].tolist() == pytest.approx([1 / 14, 8 / 14, 5 / 14, 0.0], abs=1e-15)


def fft_float32_tolerance(*z):
    """How far two evaluations of frequency_triplet_loss that agree in exact arithmetic may differ. The function
    computes in float32 whatever the input dtype (``x.float()``, as the official code), and torch's FFT and
    reductions are not bit-reproducible across CPUs or shapes (rolled inputs, [B, L, D] vs [L, D]). A float32 FFT is
    accurate to about eps32·log2(L) relative to the spectrum, so the two MSE terms, of the size of the spectral
    energy mean|FFT z|², move by about eps32·log2(L)·energy: 4× that, summed over the three inputs (~3e-5 here;
    seen: 2.4e-7 and, on another x86 CPU, up to 1.4e-6; a spectrum that is not shift-invariant, e.g. the FFT's real
    part instead of its magnitude, changes this loss by O(1): 2.83 against 1.91)."""
    eps32 = torch.finfo(torch.float32).eps
    energy = sum(torch.fft.fft(x.double(), dim=-2).abs().pow(2).mean().item() for x in z)
    return 4 * eps32 * math.log2(z[0].shape[-2]) * energy


def test_fft_triplet_is_shift_invariant_zero_past_the_margin_and_per_pair():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    base = frequency_triplet_loss(*z, margin=0.5)
    assert base.dtype == torch.float32  # computed in float32 (hence the tolerances below)
    shifted = frequency_triplet_loss(*(torch.roll(x, 3, dims=0) for x in z), margin=0.5)
    assert 0 < base.item() and shifted.item() == pytest.approx(base.item(), abs=fft_float32_tolerance(*z))
    far = frequency_triplet_loss(z[0], z[0] + 0.01, z[0] + 3.0, margin=0.5)  # negative ≫ positive + margin
    assert far.item() == 0.0
    batched = frequency_triplet_loss(torch.stack([z[0], z[1]]), torch.stack([z[1], z[2]]), torch.stack([z[2], z[0]]))
    per_pair = [frequency_triplet_loss(z[0], z[1], z[2]).item(), frequency_triplet_loss(z[1], z[2], z[0]).item()]
    assert batched.tolist() == pytest.approx(per_pair, abs=fft_float32_tolerance(*z))


def test_no_perturbation_and_no_triplet_is_dpo_and_gradient_signs():
    policy = [[[-1.0, -0.5], [-2.0]], [[-1.5, -0.7, -0.2], [-1.0]]]
    reference = [[[-1.1, -0.6], [-1.8]], [[-1.2, -0.6, -0.3], [-1.3]]]
    ctx, dpo_ctx = make_context(policy, reference), make_context(policy, reference)
    out, dpo = TARS(beta=0.1, beta_fre=0).loss(ctx), DPO(beta=0.1).loss(dpo_ctx)
    assert out.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    out.loss.backward()
    dpo.loss.backward()
    g = ctx.token_logps.grad
    assert torch.equal(g, dpo_ctx.token_logps.grad)
    assert (g[0][ctx.mask[0] > 0] < 0).all() and (g[1][ctx.mask[1] > 0] > 0).all()


def test_triplet_gradient_pulls_the_anchor_towards_the_original_chosen():
    z_pw = t(Z_PW).requires_grad_(True)
    ctx = make_context(CARD_POLICY, CARD_REFERENCE, outputs=SimpleNamespace(hidden_states=[z_pw[None]]),
                       batch={"tars_ref_hidden": t([[Z_CW], [Z_CR]])})  # fmt: skip
    TARS(beta_fre=0.1).loss(ctx).loss.backward()
    step = z_pw.detach() - 1.0 * z_pw.grad  # a gradient step on the anchor lowers the triplet loss
    assert frequency_triplet_loss(step, t(Z_CW), t(Z_CR)) < frequency_triplet_loss(t(Z_PW), t(Z_CW), t(Z_CR))


# -- the perturbation step (collator) ------------------------------------------------------------------------------


def examples(n=4, prompt_len=6, chosen_len=9, rejected_len=5, **extra):
    """Rows as the tokenize hook writes them: BOS-led prompt, EOS-ended responses, ids in 10..49."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        def ids(k):
            return (torch.randint(10, 50, (k,), generator=g)).tolist()
        rows.append({"prompt_ids": [2] + ids(prompt_len - 1 + i % 2), "chosen_ids": ids(chosen_len - 1) + [3],
                     "rejected_ids": ids(rejected_len - 1 + i) + [3],
                     **{k: v[i] if isinstance(v, list) else v for k, v in extra.items()}})  # fmt: skip
    return rows


TOKENIZER = SimpleNamespace(vocab_size=50, mask_token_id=1, unk_token_id=None, bos_token_id=2, eos_token_id=3,
                            pad_token_id=0)  # fmt: skip


def with_tokenizer(method, tokenizer=TOKENIZER):
    method.tokenizer = tokenizer  # as PlusTrainer sets it
    return method


def collate(rows, max_length=None, **args):
    return with_tokenizer(TARS(**args)).collator(pad_token_id=0, max_length=max_length)(rows)


def test_perturbation_respects_specials_padding_labels_and_count():
    rows = examples()
    plain = collate(rows, adv_p=0.0, beta_fre=0)
    for seed in range(20):
        batch = collate(rows, adv_p=0.3, seed=seed, beta_fre=0.1)
        perturbed = batch["tars_perturbed"]
        assert torch.equal(batch["tars_original_input_ids"], plain["input_ids"])
        changed = batch["input_ids"] != plain["input_ids"]
        assert (changed <= perturbed).all()  # a replacement may draw the same id by chance
        special = torch.isin(plain["input_ids"], torch.tensor(INFO["special_ids"]))
        assert not (perturbed & special).any() and not (perturbed & (plain["attention_mask"] == 0)).any()
        assert (batch["completion_mask"] == plain["completion_mask"] * ~perturbed).all()  # labels −100 there
        assert ((batch["input_ids"][perturbed] >= 5) & (batch["input_ids"][perturbed] < 50)).all()
        for rows_ in (slice(0, 4), slice(4, 8)):
            n = int(plain["attention_mask"][rows_].sum())
            drawn = max(1, math.floor(n * 0.3))
            kept = int(perturbed[rows_].sum())
            assert drawn - int(special[rows_].sum()) <= kept <= drawn  # specials drawn are dropped


def test_sample_positions_draws_exactly_n_and_nothing_at_p_zero():
    g = torch.Generator().manual_seed(0)
    candidates = torch.ones(3, 10)
    candidates[2, 6:] = 0
    for p, expected in ((0.05, 1), (0.01, 1), (0.3, 7), (1.0, 26)):
        drawn = sample_positions(torch.zeros(3, 10), candidates, p, g)
        assert int(drawn.sum()) == expected and not drawn[2, 6:].any()
    assert not sample_positions(torch.zeros(3, 10), candidates, 0.0, g).any()
    relevance = torch.ones(3, 10)
    relevance[1, 4] = 0.2  # the only position with a positive score: N is capped at 1
    drawn = sample_positions(relevance, candidates, 0.5, g)
    assert drawn.nonzero().tolist() == [[1, 4]]


def test_relevance_column_steers_the_perturbation_and_none_means_never():
    # relevance per prompt+response token: only the third response token of each chosen sequence is irrelevant
    rows = examples(n=2, prompt_len=6, chosen_len=9, rejected_len=5)
    for row in rows:
        lp, lc = len(row["prompt_ids"]), len(row["chosen_ids"])
        row["chosen_relevance"] = [1.0] * (lp + 2) + [0.0] + [None] * (lc - 3)
    for seed in range(5):
        batch = collate(rows, adv_p=0.2, seed=seed, beta_fre=0)
        chosen = batch["tars_perturbed"][:2]
        for b, row in enumerate(rows):
            assert chosen[b].nonzero().flatten().tolist() in ([], [len(row["prompt_ids"]) + 2])
        assert chosen.sum() >= 1
    ignored = collate(rows, adv_p=0.2, seed=0, beta_fre=0, relevance_column="ignore")["tars_perturbed"][:2]
    assert collate(rows, adv_p=0.2, seed=0, beta_fre=0)["tars_perturbed"][:2].sum() <= 2 < 1 + ignored.sum()


def test_prompt_scope_mask_mode_and_truncation():
    rows = examples()
    plain = collate(rows, adv_p=0.0, beta_fre=0)
    batch = collate(rows, adv_p=0.5, beta_fre=0, perturb_prompt=False, token_mode="mask", seed=3)
    perturbed = batch["tars_perturbed"]
    assert perturbed.any() and not (perturbed & (plain["completion_mask"] == 0)).any()
    assert (batch["input_ids"][perturbed] == INFO["mask_id"]).all()
    # truncation keeps scores aligned: relevance 0 only on the last kept position of every sequence
    short = examples(n=2)
    for row in short:
        for side, col in (("chosen_ids", "chosen_relevance"), ("rejected_ids", "rejected_relevance")):
            total = len(row["prompt_ids"]) + len(row[side])
            row[col] = [1.0] * 7 + [0.0] + [1.0] * (total - 8)
    batch = collate(short, max_length=8, adv_p=0.5, beta_fre=0, seed=0)
    assert batch["input_ids"].shape[1] == 8 and batch["tars_perturbed"].nonzero().tolist() == [[r, 7] for r in range(4)]


def test_same_seed_same_batches_different_seed_different():
    rows = examples(n=8)

    def run(seed):
        collator = with_tokenizer(TARS(adv_p=0.1, seed=seed, beta_fre=0)).collator(pad_token_id=0, max_length=None)
        return [collator(rows)["input_ids"] for _ in range(3)]

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # successive batches draw afresh
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


# -- the tokenize hook and errors -------------------------------------------------------------------------------------


def test_tokenize_aligns_relevance_and_errors_name_the_field_and_fix():
    tok = build_tokenizer()
    row = {"prompt": "Q? ", "chosen": "ab", "rejected": "xyz"}
    out = tokenize_tars(row, tok)
    assert tokenizer_facts(TOKENIZER) == INFO
    assert tokenizer_facts(tok) == {"vocab_size": tok.vocab_size, "mask_id": tok.unk_token_id,
                                     "special_ids": sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id})}  # fmt: skip
    lp, lc = len(out["prompt_ids"]), len(out["chosen_ids"])  # "ab" + EOS
    assert lc == 3
    aligned = tokenize_tars({**row, "chosen_relevance": [0.5, 0.25], "rejected_relevance": None}, tok)
    assert aligned["chosen_relevance"] == [1.0] * lp + [0.5, 0.25, 1.0] and "rejected_relevance" not in aligned
    with pytest.raises(TrlPlusError, match=r"'chosen_relevance'.*relevance_column: auto"):
        tokenize_tars(row, tok, relevance_column="require")
    with pytest.raises(TrlPlusError, match=r"'chosen_relevance' has 5 values"):
        tokenize_tars({**row, "chosen_relevance": [0.1] * 5}, tok)
    with pytest.raises(TrlPlusError, match=r"outside \[0, 1\]"):
        tokenize_tars({**row, "chosen_relevance": [1.5, 0.0]}, tok)


def test_required_relevance_missing_from_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(TrlPlusError, match="no 'chosen_relevance'"):
        train_tiny("tars", tmp_path, method_args={"relevance_column": "require"}, max_steps=1)


def test_config_and_reference_errors():
    with pytest.raises(ValidationError, match="unknown relevance"):
        TARS(relevance="clip")
    with pytest.raises(ValidationError):
        TARS(adv_p=1.5)
    with pytest.raises(ValidationError):
        TARS(beta_fr=0.1)  # a typo is an error
    trainer = SimpleNamespace(ref_model=None, model=torch.nn.Linear(1, 1),
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))  # fmt: skip
    with pytest.raises(TrlPlusError, match="precomputed"):
        _reference_hidden_states(trainer, {}, 0, [0, 1])
    assert not TARS(beta_fre=0).needs.hidden_states and TARS().needs.hidden_states
    with pytest.raises(TrlPlusError, match=r"reference.mode: method 'tars' changes its sequences at every step"):
        resolve_reference_mode(TARS(), "precomputed", is_peft=True, has_ref_model=False)
    assert resolve_reference_mode(TARS(adv_p=0.0), "precomputed", is_peft=True, has_ref_model=False) == "precomputed"
    assert TARS(relevance_column="ignore").needs.optional_fields == ()


# -- the real trainer ---------------------------------------------------------------------------------------------------


def trainer_with_method(trainer, method):
    """``trainer`` now computing ``method``'s loss (its needs are read at every step)."""
    trainer.method = method
    return trainer


def test_on_the_same_batch_tars_is_dpo_on_the_perturbed_pairs_plus_the_triplet(tmp_path):
    tokenizer = build_tokenizer()

    def trainer(method, **method_args):
        return tiny_trainer(method, tmp_path, method_args, rows=preference_rows(6))

    trainers = {"dpo": trainer("dpo"), "on": trainer("tars", adv_p=0.1, beta_fre=0.5, freq_examples="all", seed=1)}
    for tr in trainers.values():
        perturb(tr.model)  # the same noise for every copy: the policy leaves the reference
        tr.model.eval()
    rows = [trainers["on"].train_dataset[i] for i in range(6)]
    batches = {"dpo": trainers["dpo"].data_collator([trainers["dpo"].train_dataset[i] for i in range(6)]),
               "on": trainers["on"].data_collator(rows),
               "off": with_tokenizer(TARS(adv_p=0.0, beta_fre=0.0), tokenizer).collator(tokenizer.pad_token_id, None)(rows)}  # fmt: skip
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batches["dpo"][key], batches["off"][key])  # tokenized and collated as TRL does
    on = batches["on"]
    assert on["tars_perturbed"].any() and not torch.equal(on["input_ids"], batches["dpo"]["input_ids"])
    off_trainer = trainer_with_method(trainers["on"], TARS(adv_p=0.0, beta_fre=0.0))
    with torch.no_grad():
        dpo = trainers["dpo"].compute_loss(trainers["dpo"].model, batches["dpo"]).item()
        off = off_trainer.compute_loss(off_trainer.model, batches["off"]).item()
        dpo_on_perturbed = trainers["dpo"].compute_loss(trainers["dpo"].model, dict(on)).item()
        trainer_with_method(trainers["on"], TARS(adv_p=0.1, beta_fre=0.5, freq_examples="all"))
        tars = trainers["on"].compute_loss(trainers["on"].model, on).item()
        policy_embed = trainers["on"].model.get_input_embeddings()
        ref_embed = trainers["on"].ref_model.get_input_embeddings()
        z_pw = policy_embed(on["input_ids"][:6])
        z_cw, z_cr = ref_embed(on["tars_original_input_ids"][:6]), ref_embed(on["tars_original_input_ids"][6:])
        freq = frequency_triplet_loss(z_pw, z_cw, z_cr, 0.5).mean().item()
    assert abs(dpo - math.log(2)) > 1e-3
    assert off == pytest.approx(dpo, abs=1e-6)
    assert abs(dpo_on_perturbed - dpo) > 1e-4
    assert tars == pytest.approx(dpo_on_perturbed + 0.5 * freq, abs=1e-5)
    assert trainers["on"]._metrics["eval"]["tars/freq_loss"][-1] == pytest.approx(freq, abs=1e-5)


def test_a_few_steps_raise_the_margin(tmp_path):
    logs = [e for e in train_tiny("tars", tmp_path, rows=preference_rows(16), max_steps=6).state.log_history if "loss" in e]
    assert logs[0]["tars/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert all(0 < e["tars/perturbed_fraction"] <= 0.05 for e in logs) and all("tars/freq_loss" in e for e in logs)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/tars.yaml").read_text())
    assert recipe["method"] == "tars" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/tars.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
