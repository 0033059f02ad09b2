"""Answer metrics against hand-worked cases: exact hit, SQuAD normalization / EM / F1, and the intervals."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tasks.metrics import exact_hit, exact_match, f1_score, first_line, normalize_answer, score
from tasks.results import mean_interval, summarize, wilson


def test_exact_hit_is_the_authors_raw_containment():
    assert exact_hit(" The code is 4721.\nQuestion:", "4721")
    assert exact_hit("4721", " 4721 ")  # the gold is stripped
    assert not exact_hit("paris is nice", "Paris")  # case-sensitive, unnormalized
    assert not exact_hit("anything", "")  # an empty gold never hits
    assert not exact_hit("47 21", "4721")


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("  \tU.S.A.\n") == "usa"


def test_exact_match():
    assert exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0


def test_f1_hand_worked():
    # [cat, sat, on, mat] vs [cat, on, mat]: 3 common, P = 3/4, R = 1, F1 = 2 * 0.75 / 1.75
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # duplicates count once per gold occurrence: 1 common, P = 1/3, R = 1/2, F1 = 0.4
    assert f1_score("red red red", "red car") == pytest.approx(0.4)
    assert f1_score("blue", "red car") == 0.0
    assert f1_score("the", "a") == 1.0  # both normalize to nothing
    assert f1_score("", "red") == 0.0


def test_score_uses_the_first_line_for_em_and_f1():
    assert first_line("\n  4721 \nQuestion: next") == "4721"
    assert score(" 4721\nQuestion: What is", "4721") == {"exact_hit": 1.0, "em": 1.0, "f1": 1.0}
    # [i, think, 4721] vs [4721]: P = 1/3, R = 1, F1 = 0.5
    assert score("I think 4721", "4721") == {"exact_hit": 1.0, "em": 0.0, "f1": pytest.approx(0.5)}
    assert score("no idea\n4721", "4721") == {"exact_hit": 1.0, "em": 0.0, "f1": 0.0}


def test_wilson_interval():
    lo, hi = wilson(0, 5)  # 0 hits: [0, z^2/n / (1 + z^2/n)] = [0, 0.76829/1.76829]
    assert lo == 0.0 and hi == pytest.approx(0.434482, abs=1e-6)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-6), pytest.approx(0.763407, abs=1e-6))
    assert wilson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_mean_interval():
    lo, hi = mean_interval(pd.Series([0.0, 1.0, 0.5]))  # sd 0.5, SE 0.5/sqrt(3), half 1.959964 * 0.288675
    assert (lo, hi) == (pytest.approx(0.5 - 0.565793, abs=1e-6), pytest.approx(0.5 + 0.565793, abs=1e-6))
    assert all(math.isnan(v) for v in mean_interval(pd.Series([0.3])))


def test_summarize_groups_per_distance():
    rows = [
        {"dataset": "d", "model": "m", "memory_kind": "memoryllm", "control": "memory", "distance_tokens": dist}
        | {"n_distractors": dist // 500, "exact_hit": hit, "em": 0, "f1": f1}
        for dist, hit, f1 in [(0, 1, 1.0), (0, 1, 0.5), (1000, 0, 0.0), (1000, 1, 1.0)]
    ]
    summary = summarize(pd.DataFrame(rows))
    assert list(summary.distance_tokens) == [0, 1000]
    assert list(summary.n) == [2, 2]
    assert list(summary.n_distractors) == [0, 2]
    assert list(summary.exact_hit) == [1.0, 0.5]
    assert list(summary.f1) == [0.75, 0.5]
    assert summary.exact_hit_lo[1] == pytest.approx(wilson(1, 2)[0])
    assert summary.f1_hi[0] == pytest.approx(0.75 + 1.959964 * 0.353553 / math.sqrt(2), abs=1e-5)
