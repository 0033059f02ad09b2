"""Tokenizers: the checkpoint's own through transformers.AutoTokenizer, or a byte-level one for presets.

The memory models have their own bos row, so text is always encoded without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path):
    """transformers.AutoTokenizer for a local directory or hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path))


def load_saved_tokenizer(directory: Path):
    """A tokenizer that `save_pretrained` wrote into `directory` (the demo's converted checkpoint), loaded as the
    class its tokenizer_config.json names (the fast one where there is one, as AutoTokenizer would): AutoTokenizer
    first loads the model's config to choose a class, which imports about a second of transformers' modelling
    code in every fresh process. A directory that names no known class goes through AutoTokenizer."""
    import transformers

    name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    saved = name and (getattr(transformers, f"{name}Fast", None) or getattr(transformers, name, None))
    return saved.from_pretrained(str(directory)) if saved else load_tokenizer(directory)


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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, question: str, system: str | None = None, default_system: bool = True) -> str:
    """`question` as a user turn of the tokenizer's chat template (after a `system` turn if given), with the
    assistant's turn opened. A BOS the template inserts is left out (the memory models have their own bos
    row); a BOS token that the template writes as a turn marker (SmolLM2's <|im_start|>) stays. Without a
    `system` turn and with `default_system` False, a system turn the template adds on its own (SmolLM2's,
    Qwen2.5's) is left out too."""
    if not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = render_chat(tokenizer, messages, generation=True)
    if system or default_system:
        return text
    from jinja2 import TemplateError  # needed by apply_chat_template, and only there

    marker = "\x00system\x00"  # the template's system turn is `before` + content + `after`
    try:
        alone = render_chat(tokenizer, [{"role": "system", "content": marker}], generation=False)
    except TemplateError:  # a template without a system role
        return text
    before, _, after = alone.partition(marker)
    end = text.find(after, len(before)) if after and text.startswith(before) else -1
    return text if end < 0 else text[end + len(after) :]


def render_chat(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    """The chat template applied to `messages`, without a BOS it inserts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    bos = tokenizer.bos_token
    if bos and "bos_token" in tokenizer.chat_template and text.startswith(bos):
        text = text[len(bos) :]
    return text


def chat_ids(tokenizer, question: str, system: str | None = None, default_system: bool = True) -> list[int]:
    """The token ids of `chat_text`."""
    return encode(tokenizer, chat_text(tokenizer, question, system, default_system))


def is_templated(tokenizer, text: str) -> bool:
    """Whether `text` already holds a user turn of the tokenizer's chat template (the line that opens it)."""
    if not has_chat_template(tokenizer):
        return False
    marker = "\x00question\x00"
    lines = [line.strip() for line in chat_text(tokenizer, marker).split(marker)[0].splitlines() if line.strip()]
    return bool(lines) and lines[-1] in text


def wants_chat(tokenizer, text: str, chat: bool | None) -> bool:
    """--chat / --no-chat as given; by default (None) the chat template when the tokenizer has one and the
    text is not already templated."""
    if chat is not None:
        return chat
    return has_chat_template(tokenizer) and not is_templated(tokenizer, text)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
