"""What every dataset gives a sweep: samples (evidence, question, answer) and distractor passages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class DataError(Exception):
    """The data is there but cannot be used (malformed, too small, unreachable hub)."""


@dataclass(frozen=True)
class Sample:
    id: str
    context: str  # the evidence to inject
    question: str
    answer: str  # the gold answer (SQuAD: the first listed answer, as the authors)
    depth: int | None = None  # needle in a haystack: where the needle is, in percent of the haystack
    haystack: int | None = None  # needle in a haystack: the haystack's length in tokens, needle excluded


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
