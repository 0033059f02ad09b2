"""Tokenizers: the checkpoint's own through transformers.AutoTokenizer, or a byte-level one for presets.

The memory models have their own bos row, so text is always encoded without special tokens.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path):
    """transformers.AutoTokenizer for a local directory or hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path))


def byte_tokenizer():
    """A 256-symbol byte-level BPE with no merges, plus <|eos|> and <|pad|> (ids 256, 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|pad|>")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chat_ids(tokenizer, question: str) -> list[int]:
    """`question` as a user turn of the tokenizer's chat template, with the assistant's turn opened. A BOS
    the template inserts is left out (the memory models have their own bos row); a BOS token that the
    template writes as a turn marker (SmolLM2's <|im_start|>) stays."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this tokenizer has no chat template")
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    if bos and "bos_token" in template and text.startswith(bos):
        text = text[len(bos) :]
    return encode(tokenizer, text)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
