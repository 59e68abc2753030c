"""Tiny local models and a byte-level tokenizer, saved to a folder and loaded back with ``from_pretrained``.

Used by the tests, the demo and the notebooks; nothing here touches a model hub.

    path = make_tiny_causal_lm(tmp_path / "policy")        # random-init Qwen2 + tokenizer
    reward_path = make_tiny_reward_model(tmp_path / "rm")  # same backbone, 1-label score head
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad, im_start, im_end) with a ChatML-style template.

    Every string round-trips exactly through encode/decode; ``<|im_end|>`` is the EOS token.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast, arch: str = "qwen2", hidden_size: int = 64, num_layers: int = 2):
    """Config of a random-init decoder small enough to train in seconds on a CPU."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"Unknown tiny architecture {arch!r}. Valid: qwen2, llama.")


def make_tiny_causal_lm(path: str | Path, arch: str = "qwen2", seed: int = 0, **config_kwargs) -> str:
    """Save a random-init causal LM and its tokenizer to ``path``; return the path as a string."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, arch, **config_kwargs))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_tiny_reward_model(path: str | Path, arch: str = "qwen2", seed: int = 1, **config_kwargs) -> str:
    """Save a random-init sequence-classification model (``num_labels=1``) for reward/value use."""
    tokenizer = byte_tokenizer()
    config = tiny_config(tokenizer, arch, **config_kwargs)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
