"""A tiny random-initialised Llama and a byte-level tokenizer, built offline in a second.

For tests and smoke runs of the whole pipeline (quantize -> save -> load) without downloading or
loading a real model. The tokenizer maps every UTF-8 byte to a token (256 ids) plus ``<eos>``
(id 256), so any text tokenizes.
"""

from __future__ import annotations

import os

import torch


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over UTF-8 bytes (vocabulary 257: 256 bytes + ``<eos>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in enumerate(sorted(alphabet, key=lambda ch: _byte_of(ch)))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to 256 + i
    o = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if o in printable:
        return o
    rest = [b for b in range(256) if b not in printable]
    return rest[o - 256]


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, vocab: int = 257):
    """A random-initialised ``LlamaForCausalLM`` (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=256, pad_token_id=256,
    )
    model = LlamaForCausalLM(cfg)
    # A larger init than the default 0.02 gives weights and activations with some structure
    # (outliers, correlated inputs) for the quantizers to work on.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny_model(path: str, seed: int = 0, **kwargs) -> str:
    """Write a tiny Llama and the byte tokenizer as an HF directory; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    tiny_llama(seed, **kwargs).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
