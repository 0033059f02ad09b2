"""What every dataset gives a sweep: samples (evidence, question, answer) and distractor passages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from model.zoo import hub


class DataError(Exception):
    """The data is there but cannot be used (malformed, too small, unreachable hub)."""


def one_line(error: Exception) -> str:
    """An error's type and message on one line of at most 300 characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


@contextmanager
def from_hub(what: str, instead: str) -> Iterator[None]:
    """Reading `what` from the hub: refused at once when it is unreachable (its clients would retry for half a
    minute), quiet, and any failure a DataError on one line that ends with `instead` (what to do)."""
    if not hub.offline() and not hub.reachable():
        raise DataError(f"the hub ({hub.endpoint()}) is unreachable: {instead}")
    try:
        with hub.quiet():
            yield
    except Exception as e:  # network, authentication, format
        raise DataError(f"cannot load {what} from the hub ({one_line(e)}); {instead}") from e


@dataclass(frozen=True)
class Sample:
    id: str
    context: str  # the evidence to inject
    question: str
    answer: str  # the gold answer (SQuAD: the first listed answer, as the authors)
    depth: int | None = None  # needle in a haystack: where the needle is, in percent of the haystack
    haystack: int | None = None  # needle in a haystack: the haystack's length in tokens, needle excluded
    answer_prefix: str = ""  # the start of the answer, written after the question (needles, as RULER's)


@dataclass
class QAData:
    name: str
    samples: list[Sample]
    distractors: list[str]  # passages from a split the questions do not come from, in source order
    source: str  # where the data came from, for config.json


def take_chars(passages: Iterable[str], chars: int) -> list[str]:
    """Passages in order until they hold at least `chars` characters."""
    taken, total = [], 0
    for passage in passages:
        if total >= chars:
            break
        taken.append(passage)
        total += len(passage)
    return taken
