"""Loading tokenizers: a tokenizer this project saved loads as AutoTokenizer loads it, without the model's config."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

import model.text.tokenizer as tokenizer_module
from model.text.tokenizer import byte_tokenizer, load_saved_tokenizer, load_tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def saved(directory: Path) -> Path:
    """The byte tokenizer with a chat template, written by save_pretrained as the demo's conversion writes its own."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_a_saved_tokenizer_loads_as_autotokenizer_loads_it_without_the_models_config(tmp_path, monkeypatch):
    directory = saved(tmp_path)
    auto = load_tokenizer(directory)

    def no_config(*args, **kwargs):
        raise AssertionError("the model's config was loaded")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_config)
    direct = load_saved_tokenizer(directory)
    assert type(direct) is type(auto)
    for text in ("Hello  world\n", "café 😀 <|eos|>", ""):
        assert direct.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
    assert (direct.eos_token_id, direct.pad_token_id) == (auto.eos_token_id, auto.pad_token_id) == (256, 257)
    assert direct.chat_template == auto.chat_template == TEMPLATE


def test_a_directory_naming_no_known_class_goes_through_autotokenizer(tmp_path, monkeypatch):
    directory = saved(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "NoSuchTokenizer"}))
    asked = []
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda d: asked.append(d) or "auto")
    assert load_saved_tokenizer(directory) == "auto" and asked == [directory]
