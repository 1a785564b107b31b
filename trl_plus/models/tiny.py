"""A tiny offline Llama and a character-level tokenizer: what the built-in ``tiny-llama`` model alias builds.

They need no network, so the CPU quickstart, the tests and plugin authors' tests all run anywhere. The model is
random (seeded), so it learns preferences quickly but says nothing sensible.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII (pad, unk, bos ``<s>``, eos ``</s>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer=None, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **config_overrides):
    """A randomly initialised (seeded) ``LlamaForCausalLM`` sized for CPU tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **config_overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: str | Path, **model_kwargs) -> str:
    """Write the tiny model and its tokenizer to ``directory`` (``from_pretrained`` loads it); return the path."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
