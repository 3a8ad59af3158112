"""Tiny random models and a character-level tokenizer, built locally (no downloads).

Used by the tests and by presets such as ``configs/tiny.yaml`` (``student.model: tiny``). The tokenizer
is a real Hugging Face fast tokenizer (``tokenizers`` BPE model with no merges, so one token per
character) with a ChatML chat template; ``save_pretrained`` / ``from_pretrained`` round-trip it.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|im_end|>", "<unk>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START)
DEFAULT_CHARS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer(
    chars: str = DEFAULT_CHARS, chat_template: str | None = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` plus the special tokens; unknown characters map to <unk>."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


TINY_MERGES = "tiny-merges"  # `teacher.tokenizer: tiny-merges`: the character tokenizer with pair merges
PAIR_MERGES = (
    ("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("a", "t"),
    ("e", "n"), ("o", "r"), ("e", "s"), ("i", "s"), ("i", "t"), ("a", "r"), ("a", "l"), ("t", "o"),
    ("s", "t"), ("n", "d"), ("o", "u"), ("l", "e"), ("c", "o"), ("n", "t"), ("m", "e"), ("d", "e"),
    (" ", "t"), (" ", "a"), (" ", "s"), (" ", "w"), (" ", "c"), (" ", "o"), (" ", " "), ("0", "0"),
)  # fmt: skip
# GPT-2's pre-tokenizer pattern on ASCII: a word with its leading space, and `\s+(?!\S)`, which looks ahead
PRE_TOKENS = r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"


def build_merged_char_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """The character tokenizer plus 32 pair merges (``PAIR_MERGES``, one token each, after the characters)
    inside GPT-2-style pre-tokens: another vocabulary over the same text whose tokens span several of the
    character tokenizer's, and whose tokenization looks ahead. Same special tokens and chat template."""
    from tokenizers import Regex, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(DEFAULT_CHARS):
        vocab.setdefault(ch, len(vocab))
    for a, b in PAIR_MERGES:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=list(PAIR_MERGES), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENS), behavior="isolated")
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """(pad, bos, eos) token ids of ``tokenizer``; raises ValueError when one is missing."""
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    if not (isinstance(pad, int) and isinstance(bos, int) and isinstance(eos, int)):
        raise ValueError(f"the tokenizer needs single pad, bos and eos token ids, got {(pad, bos, eos)}")
    return pad, bos, eos


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
    initializer_range: float = 0.1,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM; the same seed gives the same weights.

    ``initializer_range`` is larger than the usual 0.02 so that two tiny random models disagree visibly.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    return model


def save_tiny_model_dir(path: str | Path, *, seed: int = 0, **model_kwargs: int) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face directory; returns the path."""
    path = Path(path)
    tokenizer = build_char_tokenizer()
    pad, bos, eos = special_token_ids(tokenizer)
    model = build_tiny_model(
        len(tokenizer),
        seed=seed,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        **model_kwargs,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
