"""`mplus ask` for people: the chat template by default, --system, the empty-answer hint, asking a model
without a session, and the timing and prompt that --json reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import model as mp
from model.text.tokenizer import chat_ids, chat_text, encode
from mplus_cli.app import app
from mplus_cli.commands import ask as cli

runner = CliRunner()
TEXT = "Alice keeps the spare key under the blue flowerpot by the back door. " * 4
TEMPLATE = (  # a chat template for the byte tokenizer of the tiny presets (which has none), with a default
    # system turn like SmolLM2's
    "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are a test model.\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def mplus(*args):
    return runner.invoke(app, [str(a) for a in args])


def ask_json(*args) -> dict:
    result = mplus("ask", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """The default store root, not created by the test."""
    monkeypatch.setenv("MPLUS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def templated(monkeypatch) -> None:
    """Every model the CLI loads gets a tokenizer with TEMPLATE."""
    load = mp.load

    def with_template(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.tokenizer.chat_template = TEMPLATE
        return lm

    monkeypatch.setattr(mp, "load", with_template)


@pytest.fixture
def store(tmp_path) -> Path:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    result = mplus("inject", text, "-s", "s", "--store", tmp_path / "store", "--chunk-tokens", 128, "--json")
    assert result.exit_code == 0, result.output
    return tmp_path / "store"


def first_token(lm: mp.MemoryLLM, ids: list[int]) -> int:
    """The greedy first answer token of `ids` from the model's own memory."""
    return mp.generate(lm, lm.new_state(), ids, mp.DecodeSettings(max_new_tokens=1)).token_ids[0]


def test_a_plain_question_stays_plain_for_a_tokenizer_without_chat_template(home):
    answer = ask_json("Where is the key?", "--max-new-tokens", 2)
    assert answer["chat"] is False and answer["prompt"] == "Where is the key?"
    assert answer["prompt_ids"] == encode(mp.load("tiny").tokenizer, "Where is the key?")
    chat = mplus("ask", "Where is the key?", "--chat")
    assert chat.exit_code == 2 and "no chat template: drop --chat" in chat.stderr


def test_a_plain_question_is_asked_in_the_chat_template_when_the_tokenizer_has_one(home, templated):
    lm = mp.load("tiny")
    answer = ask_json("Where is the key?", "--max-new-tokens", 2)
    assert answer["chat"] is True
    assert answer["prompt"] == "<|user|>\nWhere is the key?\n<|assistant|>\n"
    assert answer["prompt_ids"] == chat_ids(lm.tokenizer, "Where is the key?", default_system=False)
    plain = ask_json("Where is the key?", "--no-chat", "--max-new-tokens", 2)
    assert plain["chat"] is False and plain["prompt"] == "Where is the key?"


def test_an_already_templated_question_is_not_templated_twice(home, templated):
    question = "<|user|>\nWhere is the key?\n<|assistant|>\n"
    answer = ask_json(question, "--max-new-tokens", 2)
    assert answer["chat"] is False and answer["prompt"] == question
    assert answer["prompt_ids"] == encode(mp.load("tiny").tokenizer, question)


def test_system_adds_a_system_turn_and_needs_the_chat_template(home, templated):
    answer = ask_json("Where is the key?", "--system", "Answer in one word.", "--max-new-tokens", 2)
    assert answer["prompt"] == "<|system|>\nAnswer in one word.\n<|user|>\nWhere is the key?\n<|assistant|>\n"
    refused = {
        "--no-chat": mplus("ask", "Where?", "--system", "Be brief.", "--no-chat"),
        "templated": mplus("ask", "<|user|>\nWhere?\n<|assistant|>\n", "--system", "Be brief."),
    }
    for why, result in refused.items():
        assert result.exit_code == 2 and result.stdout == "", why
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "drop --system" in lines[0], why
    assert "--no-chat leaves it out" in refused["--no-chat"].stderr


def test_the_templates_own_system_turn_can_be_left_out():
    tokenizer = mp.load("tiny").tokenizer
    turns = "<|user|>\nWhere?\n<|assistant|>\n"
    for template, default in [
        (TEMPLATE, "<|system|>\nYou are a test model.\n"),
        (TEMPLATE.replace("{% if messages[0]['role'] != 'system' %}", "{% if false %}"), ""),  # none of its own
        (  # Llama-3.1 style: a header that is always there, the system message within it
            "<|system|>\nToday.\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}</s>"
            "{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            "<|system|>\nToday.\n</s>",
        ),
    ]:
        tokenizer.chat_template = template
        assert chat_text(tokenizer, "Where?") == default + turns
        assert chat_text(tokenizer, "Where?", default_system=False) == turns
    tokenizer.chat_template = (  # Gemma style: no system role, nothing to leave out
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    assert chat_text(tokenizer, "Where?", default_system=False) == turns


def test_system_without_a_chat_template_is_a_usage_error(home):
    result = mplus("ask", "Where?", "--system", "Be brief.")
    assert result.exit_code == 2 and "has none: drop --system" in result.stderr


@pytest.mark.parametrize(
    ("chat_option", "template", "hint"),
    [
        (None, False, "rephrase the question"),
        (None, True, "or try --no-chat"),
        ("--no-chat", True, "drop --no-chat"),
    ],
)
def test_an_empty_answer_gets_a_one_line_hint(home, monkeypatch, request, chat_option, template, hint):
    """The first greedy token is made a stop token, so the answer is empty."""
    if template:
        request.getfixturevalue("templated")
    lm = mp.load("tiny")
    chat = template and chat_option is None
    ids = chat_ids(lm.tokenizer, "Where?", default_system=False) if chat else encode(lm.tokenizer, "Where?")
    monkeypatch.setattr(cli, "stop_ids", lambda lm: (first_token(lm, ids),))
    result = mplus("ask", "Where?", *([chat_option] if chat_option else []))
    assert result.exit_code == 0 and result.stdout == "\n"
    notes = [line for line in result.stderr.splitlines() if line.startswith("mplus: note: the answer")]
    assert notes == [notes[0]] and notes[0].startswith("mplus: note: the answer is empty; ") and hint in notes[0]
    answered = mplus("ask", "Who?", *([chat_option] if chat_option else []), "--max-new-tokens", 2)
    assert answered.exit_code == 0 and "the answer is empty" not in answered.stderr


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus", "tiny-free-mplus"])
def test_ask_without_a_session_answers_from_the_models_own_memory_and_creates_nothing(home, tmp_path, name):
    answer = ask_json("Where is the key?", "--model", name, "--max-new-tokens", 6)
    lm = mp.load(name)
    settings = mp.DecodeSettings(max_new_tokens=6, stop_token_ids=cli.stop_ids(lm))
    expected = mp.generate(lm, lm.new_state(), encode(lm.tokenizer, "Where is the key?"), settings)
    assert answer["token_ids"] == expected.token_ids and answer["session"] is None and answer["model"] == name
    assert not home.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_ask_without_session_or_model_uses_the_default_model(home):
    result = mplus("ask", "Where?", "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["model"] == "tiny"  # $MPLUS_MODEL (conftest)
    assert "no --session" in result.stderr and not home.exists()


def test_ask_reports_its_prompts_and_timing(store):
    tokenizer = mp.load("tiny").tokenizer
    report = ask_json("Where is the key?", "Who?", "-s", "s", "--store", store, "--max-new-tokens", 5)
    timing = report["timing"]
    assert set(timing) == {"load_s", "ttft_s", "total_s", "tokens", "tokens_per_s"}
    assert all(timing[key] >= 0 for key in timing)
    spent = 0.0
    for answer, question in zip(report["answers"], ["Where is the key?", "Who?"], strict=True):
        assert answer["prompt"] == question and answer["prompt_ids"] == encode(tokenizer, question)
        own = answer["timing"]
        assert len(answer["token_ids"]) == own["tokens"] == 5  # noise never stops early at 5 bytes here
        assert 0 < own["ttft_s"] <= own["total_s"] and own["tokens_per_s"] == pytest.approx(
            5 / own["total_s"],
            0.01 + 5e-5 / own["total_s"],  # total_s is rounded to 0.1 ms
        )
        spent += own["total_s"]
    assert timing["ttft_s"] == report["answers"][0]["timing"]["ttft_s"] and timing["tokens"] == 10
    assert timing["load_s"] + spent <= timing["total_s"] + 1e-3


def test_inject_reports_its_timing(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    result = mplus("inject", text, "-s", "s", "--store", tmp_path / "store", "--chunk-tokens", 64, "--json")
    report = json.loads(result.stdout)
    timing = report["timing"]
    assert set(timing) == {"load_s", "first_commit_s", "inject_s", "total_s", "tokens_per_s"}
    assert 0 < timing["load_s"] < timing["first_commit_s"] <= timing["total_s"]
    assert timing["load_s"] + timing["inject_s"] <= timing["total_s"] + 1e-3
    assert report["tokens"] == len(TEXT.encode()) and report["chunks"] > 1
    assert timing["tokens_per_s"] == pytest.approx(report["tokens"] / timing["inject_s"], 0.01)
