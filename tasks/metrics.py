"""Answer scoring: the authors' exact hit, and SQuAD's normalized exact match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter

PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def exact_hit(prediction: str, gold: str) -> bool:
    """The authors' metric: the stripped gold string occurs in the generation (case-sensitive, raw)."""
    gold = gold.strip()
    return bool(gold) and gold in prediction


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def first_line(prediction: str) -> str:
    """The answer part of a generation: its first non-empty line (models go on with a new question)."""
    return next((line.strip() for line in prediction.splitlines() if line.strip()), "")


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(predicted: list[str], expected: list[str]) -> float:
    """Harmonic mean of token precision and recall (0 when they share no token, either side empty included)."""
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD's token F1 over normalized words (1.0 if both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    return token_f1(predicted, expected)


def score(prediction: str, gold: str) -> dict[str, float]:
    """exact_hit on the whole generation; em and f1 on its first line."""
    answer = first_line(prediction)
    return {
        "exact_hit": float(exact_hit(prediction, gold)),
        "em": exact_match(answer, gold),
        "f1": f1_score(answer, gold),
    }
