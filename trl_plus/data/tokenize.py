"""Tokenization helpers for methods with their own data shapes (TRL's DPO tokenization, generalised)."""

from __future__ import annotations


def tokenize_completions(tokenizer, prompt, completions: dict) -> dict:
    """Tokenize one prompt and several completions exactly as TRL's ``DPOTrainer`` tokenizes a pair.

    ``completions`` maps output names to completions (text, or message lists for conversational data). Returns
    ``{"prompt_ids": [...], name: [...] for each completion}`` where each completion's ids start where the tokenized
    prompt and prompt+completion first differ (chat templates may render the prompt alone differently), and plain
    text completions get the EOS token appended (conversational ones end with the template's own end of turn).
    """
    from trl.data_utils import _tokenize, common_prefix_length

    conversational = isinstance(prompt, list)
    if conversational:
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full = {name: _tokenize(tokenizer, prompt + c)["input_ids"] for name, c in completions.items()}
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full = {
            name: _tokenize(tokenizer, prompt + (c if c.endswith(eos) else c + eos))["input_ids"]
            for name, c in completions.items()
        }
    prompt_len = min([len(prompt_ids)] + [common_prefix_length(prompt_ids, ids) for ids in full.values()])
    return {"prompt_ids": prompt_ids[:prompt_len], **{name: ids[prompt_len:] for name, ids in full.items()}}


def tokenize_pair(example: dict, tokenizer) -> dict:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one preference row, as TRL's ``DPOTrainer`` tokenizes it
    (a row without ``prompt`` gets the shared prefix of ``chosen`` and ``rejected`` as its prompt)."""
    if "prompt" not in example:
        from trl.data_utils import extract_prompt

        example = {**example, **extract_prompt(example)}
    return tokenize_completions(tokenizer, example["prompt"], {"chosen_ids": example["chosen"],
                                                               "rejected_ids": example["rejected"]})  # fmt: skip


def tokenize_prompt(example: dict, tokenizer) -> dict:
    """``prompt_ids`` of one prompt-only row, as TRL tokenizes a prompt (the chat template's generation prompt for
    conversational data, the text as it is otherwise): the input an online method samples completions from."""
    from trl.data_utils import _tokenize

    prompt = example["prompt"]
    if isinstance(prompt, list):
        return {"prompt_ids": _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]}
    return {"prompt_ids": _tokenize(tokenizer, prompt)["input_ids"]}
