"""Prefix sharing and packing: the shared layout gives the plain path's per-token log-probs, losses, gradients and
loss curve; nothing attends across responses or examples; packing never splits a block; any K, variable K and
methods whose rows share nothing keep working."""

from __future__ import annotations

import pytest
import torch
from test_lists import Listwise, list_rows

from conftest import first_batch, perturb
from trl_plus import DPO, Sequence, SequencesCollator
from trl_plus.data.collate import prompt_completion
from trl_plus.data.sharing import SHARED, share_prefixes
from trl_plus.testing import preference_rows, tiny_trainer


def pair(tmp_path, method="dpo", packing=False, **kwargs):
    """The same trainer twice, plain and prefix-shared, with the same perturbed policy."""
    plain = tiny_trainer(method, tmp_path / "plain", **kwargs)
    shared = tiny_trainer(method, tmp_path / "shared", prefix_sharing=True, packing=packing, **kwargs)
    for trainer in (plain, shared):
        perturb(trainer.model, seed=5)
    return plain, shared


def logps(trainer, batch):
    with torch.no_grad():
        return trainer.fused_token_logps(trainer.model, batch)[0]


@pytest.mark.parametrize("packing", [False, True])
def test_shared_per_token_log_probs_loss_and_gradients_equal_the_plain_path(tmp_path, packing):
    plain, shared = pair(tmp_path, packing=packing)
    a, b = first_batch(plain, 8), first_batch(shared, 8)
    torch.testing.assert_close(logps(shared, b), logps(plain, a), atol=1e-5, rtol=0)
    assert SHARED in b  # built by the collator, on the CPU
    layout = share_prefixes(b, 0, num_sequences=2, pack=packing)
    assert layout.shared_tokens < layout.plain_tokens  # the prompts are forwarded once per pair
    for trainer in (plain, shared):
        trainer.model.zero_grad()
    loss_a, loss_b = plain.compute_loss(plain.model, a), shared.compute_loss(shared.model, b)
    loss_a.backward(), loss_b.backward()
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), shared.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=0, msg=name)


def test_a_dpo_loss_curve_over_10_steps_equals_the_plain_path(tmp_path):
    curves = []
    for sharing in (False, True):
        trainer = tiny_trainer("dpo", tmp_path / str(sharing), max_steps=10, prefix_sharing=sharing, packing=sharing,
                               training={"per_device_train_batch_size": 4})  # fmt: skip
        trainer.train()
        curves.append([(e["loss"], e["rewards/margins"]) for e in trainer.state.log_history if "loss" in e])
    assert len(curves[0]) == 10
    assert [c for step in curves[1] for c in step] == pytest.approx([c for step in curves[0] for c in step], abs=1e-5)


def test_no_attention_leaks_across_responses(tmp_path):
    plain, shared = pair(tmp_path)
    batch = first_batch(shared, 4)
    before = logps(shared, batch)
    changed = {k: v.clone() for k, v in batch.items() if k != SHARED}  # the trainer rebuilds the layout
    size = 4
    for b in range(size):  # every chosen token after the first one that differs from the rejected
        ids, rejected = changed["input_ids"][b], changed["input_ids"][size + b]
        first = int((ids != rejected).nonzero()[0])
        scored = changed["completion_mask"][b].bool()
        scored[: first + 1] = False
        ids[scored] = (ids[scored] + 7) % 90 + 3
    after = logps(shared, changed)
    assert torch.equal(after[size:], before[size:])  # the rejected rows, exactly
    assert not torch.equal(after[:size], before[:size])


def test_packing_never_splits_a_block_and_never_lengthens_a_row():
    rows = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
            for p, c, r in [(20, 5, 3), (2, 2, 2), (3, 1, 1), (2, 4, 1), (10, 2, 2), (1, 1, 1)]]  # fmt: skip
    from trl_plus.data.collate import PairwiseCollator

    batch = PairwiseCollator(pad_token_id=0, max_length=None)(rows)
    plain = share_prefixes(batch, 0, num_sequences=2)
    packed = share_prefixes(batch, 0, num_sequences=2, pack=True)
    assert plain.input_ids.shape[0] == 6 and packed.input_ids.shape[0] < 6
    assert packed.input_ids.shape[1] == plain.input_ids.shape[1]  # the longest block, both ways
    assert packed.shared_tokens == plain.shared_tokens
    # each block is contiguous in one row: its tokens see each other (the mask's block structure is intact)
    mask = packed.attention_mask[:, 0]
    for row in range(mask.size(0)):
        real = packed.input_ids[row] != 0
        first_token_of_block = real & (packed.position_ids[row] == 0)
        assert int(first_token_of_block.sum()) >= 1
        starts = first_token_of_block.nonzero()[:, 0].tolist() + [int(real.sum())]
        for start, end in zip(starts, starts[1:]):
            assert mask[row, end - 1, start] and mask[row, start:end, :start].sum() == 0  # sees its block only


def test_variable_k_lists_and_the_precomputed_reference_through_sharing(tmp_path):
    plain = tiny_trainer(Listwise, tmp_path / "plain", rows=list_rows())
    shared = tiny_trainer(Listwise, tmp_path / "shared", rows=list_rows(), prefix_sharing=True, packing=True,
                          reference_mode="precomputed")  # fmt: skip
    for trainer in (plain, shared):
        perturb(trainer.model, seed=6)
    with torch.no_grad():
        a = plain.compute_loss(plain.model, first_batch(plain, 4))
        b = shared.compute_loss(shared.model, first_batch(shared, 4))
    assert b.item() == pytest.approx(a.item(), abs=1e-5)


class PromptPerSide(DPO):
    """DPO where each side has its own prompt (rows share little): sharing must stay exact."""

    name = "test-prompt-per-side"

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        def sequences(example):
            other = [7, 8] + example["prompt_ids"]
            return [Sequence(*prompt_completion(example["prompt_ids"], example["chosen_ids"])),
                    Sequence(*prompt_completion(other, example["rejected_ids"]))]  # fmt: skip

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode)


def test_rows_that_share_nothing_stay_exact(tmp_path):
    plain, shared = pair(tmp_path, PromptPerSide)
    a, b = first_batch(plain, 4), first_batch(shared, 4)
    torch.testing.assert_close(logps(shared, b), logps(plain, a), atol=1e-5, rtol=0)
    layout = share_prefixes(b, 0, num_sequences=2)
    assert layout.shared_tokens == layout.plain_tokens  # nothing in common: no saving, no error


def test_lora_and_truncation_through_sharing(tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    plain = tiny_trainer("dpo", tmp_path / "plain", peft_config=lora(), training={"max_length": 40})
    shared = tiny_trainer("dpo", tmp_path / "shared", peft_config=lora(), training={"max_length": 40},
                          prefix_sharing=True)  # fmt: skip
    a, b = first_batch(plain, 8), first_batch(shared, 8)
    assert int(a["num_truncated"]) > 0 and torch.equal(a["num_truncated"], b["num_truncated"])
    torch.testing.assert_close(logps(shared, b), logps(plain, a), atol=1e-5, rtol=0)
    with torch.no_grad():  # the reference: the adapter switched off, on the shared layout too
        torch.testing.assert_close(shared.reference_token_logps(b), plain.reference_token_logps(a), atol=1e-5, rtol=0)


def test_smollm2s_architecture_through_sharing(tmp_path):
    """A random model of SmolLM2-135M's shape (GQA 9/3 heads, tied embeddings, rope theta 1e5), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_plus.testing import build_tokenizer

    config = LlamaConfig(vocab_size=build_tokenizer().vocab_size, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=512, rms_norm_eps=1e-5)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rows = preference_rows(8)
    plain = tiny_trainer("dpo", tmp_path / "plain", rows=rows, model=model)
    shared = tiny_trainer("dpo", tmp_path / "shared", rows=rows, model=model, prefix_sharing=True, packing=True)
    torch.testing.assert_close(logps(shared, first_batch(shared, 8)), logps(plain, first_batch(plain, 8)),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_packing_without_sharing_is_an_error(tmp_path):
    from trl_plus import TrlPlusError

    with pytest.raises(TrlPlusError, match="packing packs prefix-shared blocks"):
        tiny_trainer("dpo", tmp_path, packing=True)


def test_a_4bit_qlora_policy_through_sharing(tmp_path):
    """QLoRA: the tiny model's base in 4-bit NF4 (double quantisation), a LoRA adapter with non-zero B; the
    policy and the reference (the adapter switched off) on the shared layout equal the plain path."""
    from peft import LoraConfig

    from trl_plus.config import ModelSpec, QuantizationSpec
    from trl_plus.models.load import load_model

    def trainer(path, **kwargs):
        model = load_model(ModelSpec(name_or_path="tiny-llama", quantization=QuantizationSpec(compute_dtype="float32")),
                           gradient_checkpointing=False)  # fmt: skip
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return tiny_trainer("dpo", tmp_path / path, model=model, peft_config=lora, **kwargs)

    plain, shared = trainer("plain"), trainer("shared", prefix_sharing=True, packing=True)
    assert plain.model.is_loaded_in_4bit
    a, b = first_batch(plain, 8), first_batch(shared, 8)
    torch.testing.assert_close(logps(shared, b), logps(plain, a), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(shared.reference_token_logps(b), plain.reference_token_logps(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("packing", [False, True])
def test_flex_attention_block_mask_gives_the_plain_log_probs(tmp_path, packing, monkeypatch):
    """A FlexAttention model (``attn_implementation: flex_attention``) gets the shared layout's mask as a BlockMask
    with the dense mask's rule: the same per-token log-probs as the plain rows (1e-5, float32). On a CPU, FlexAttention
    runs forward only and uncompiled here (torch has no CPU backward; compiling costs ~40 s), so this checks the mask,
    not the GPU kernel's speed."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention
    from transformers.integrations.flex_attention import WrappedFlexAttention

    from trl_plus.data.sharing import uses_flex_attention

    monkeypatch.setattr(WrappedFlexAttention, "__call__", lambda self: flex_attention)  # eager: no compile
    plain, shared = pair(tmp_path, packing=packing)
    a, b = first_batch(plain, 8), first_batch(shared, 8)
    layout = shared.shared_layout(b)
    dense, blocks = layout.attention_mask, layout.block_mask()
    rows, width = layout.example.shape
    assert torch.equal(create_mask(blocks.mask_mod, rows, 1, width, width, device="cpu"), dense)  # the same rule
    shared.model.config._attn_implementation = "flex_attention"
    assert uses_flex_attention(shared.model)
    torch.testing.assert_close(logps(shared, b), logps(plain, a), atol=1e-5, rtol=0)


def test_flex_attention_refuses_to_train_on_a_cpu(tmp_path):
    from trl_plus import TrlPlusError

    model = tiny_trainer("dpo", tmp_path / "probe").model
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(TrlPlusError, match="flex_attention trains on a GPU only"):
        tiny_trainer("dpo", tmp_path / "flex", model=model)
