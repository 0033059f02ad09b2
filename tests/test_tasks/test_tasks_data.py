"""Datasets: SQuAD / NQ from small files in the authors' layout, the hub mapping, and synthetic facts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tasks import data as qa

# -- files in the authors' layout (docs/algorithm.md §9.1) ----------------------------------------------


def qas(*items: tuple[str, str, str | None]) -> list[dict]:
    """(id, question, answer or None for an unanswerable SQuAD v2 question)."""
    return [
        {"id": i, "question": q, "answers": [{"text": a, "answer_start": 0}] if a else [], "is_impossible": a is None}
        for i, q, a in items
    ]


def write_squad(root: Path, indices: list[int]) -> Path:
    directory = root / "squad"
    directory.mkdir(parents=True)
    dev = [
        {
            "context": "Paris is the capital of France.",
            "qas": qas(("q1", "Capital of France?", "Paris"), ("q2", "?", None)),
        },
        {
            "context": "The Nile flows north.",
            "qas": qas(("q3", "Which way?", "north"), ("q4", "What flows?", "The Nile")),
        },
    ]
    train = [{"context": f"Train paragraph {i}.", "qas": []} for i in range(3)]
    for name, paragraphs in (("dev-v2.0.json", dev), ("train-v2.0.json", train)):
        (directory / name).write_text(
            json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]})
        )
    np.save(directory / "indices_squad_3.npy", np.array(indices))
    return directory


def test_squad_from_the_authors_files(tmp_path):
    write_squad(tmp_path, indices=[2, 0, 1])
    data = qa.load("squad", limit=2, data_dir=tmp_path)
    # answerable questions in file order are q1, q3, q4 (q2 is unanswerable); the index file picks 2 then 0
    assert [s.id for s in data.samples] == ["q4", "q1"]
    assert data.samples[0] == qa.Sample("q4", "The Nile flows north.", "What flows?", "The Nile")
    assert data.distractors == ["Train paragraph 0.", "Train paragraph 1.", "Train paragraph 2."]
    assert "authors' files" in data.source
    assert [s.id for s in qa.load("squad", limit=None, data_dir=tmp_path).samples] == ["q4", "q1", "q3"]


def test_the_authors_layout_may_sit_under_data(tmp_path):
    write_squad(tmp_path / "data", indices=[0])
    assert [s.id for s in qa.load("squad", limit=5, data_dir=tmp_path).samples] == ["q1"]


def test_missing_files_and_bad_indices(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data directory"):
        qa.load("squad", limit=5, data_dir=tmp_path / "nowhere")
    directory = write_squad(tmp_path, indices=[0])
    (directory / "indices_squad_3.npy").unlink()
    with pytest.raises(FileNotFoundError, match="indices_squad_3.npy"):
        qa.load("squad", limit=5, data_dir=tmp_path)
    np.save(directory / "indices_squad_3.npy", np.array([0, 7]))
    with pytest.raises(qa.DataError, match="refers to sample 7"):
        qa.load("squad", limit=5, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        qa.load("trivia", limit=5)


PAGE = [("<P>", True), ("Paris", False), ("is", False), ("the", False), ("capital", False)]
PAGE += [("of", False), ("France", False), ("</P>", True)]


def nq_dev_line(example_id: int, question: str, short: tuple[int, int] | None) -> dict:
    tokens = [{"token": t, "start_byte": 0, "end_byte": 0, "html_token": html} for t, html in PAGE]
    shorts = [{"start_token": short[0], "end_token": short[1]}] if short else []
    annotation = {"long_answer": {"start_token": 0, "end_token": 8}, "short_answers": shorts, "yes_no_answer": "NONE"}
    return {"example_id": example_id, "question_text": question, "document_tokens": tokens, "annotations": [annotation]}


def nq_train_line(text: str, start: int, end: int) -> dict:
    long = {"start_token": start, "end_token": end}
    return {"document_text": text, "annotations": [{"long_answer": long, "short_answers": []}], "example_id": 1}


def write_nq(root: Path) -> None:
    directory = root / "nq"
    directory.mkdir()
    dev = [
        nq_dev_line(10, "what is the capital of france", (1, 2)),
        nq_dev_line(11, "no short answer here", None),
        nq_dev_line(12, "what country is paris in", (6, 7)),
    ]
    page = "<H1> Title </H1> <P> Lorem ipsum dolor sit amet </P>"
    train = [nq_train_line(page, 3, 10), nq_train_line(page, -1, -1), nq_train_line("<P> Second page </P>", 0, 4)]
    for name, lines in (
        ("v1.0-simplified_nq-dev-all.jsonl", dev),
        ("v1.0-simplified_simplified-nq-train.jsonl", train),
    ):
        (directory / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    np.save(directory / "indices_nq_4.npy", np.array([1, 0]))


def test_nq_from_the_authors_files(tmp_path):
    write_nq(tmp_path)
    data = qa.load("nq", limit=None, data_dir=tmp_path, distractor_chars=10_000)
    # the line without a short answer is skipped, so index 1 is example 12; HTML tokens are dropped
    assert data.samples == [
        qa.Sample("12", "Paris is the capital of France", "what country is paris in", "France"),
        qa.Sample("10", "Paris is the capital of France", "what is the capital of france", "Paris"),
    ]
    # our distractors: long answers by token offsets, without HTML tags; a missing long answer is skipped
    assert data.distractors == ["Lorem ipsum dolor sit amet", "Second page"]


def test_nq_authors_distractors_keep_their_character_slice(tmp_path):
    write_nq(tmp_path)
    data = qa.load("nq", limit=1, data_dir=tmp_path, distractor_chars=10_000, authors=True)
    page = "<H1> Title </H1> <P> Lorem ipsum dolor sit amet </P>"
    # document_text[start_token - 1 : end_token]: characters, not tokens (docs/algorithm.md §9.1)
    assert data.distractors == [page[2:10], page[-2:-1], "<P> Second page </P>"[-1:4]]
    assert data.distractors[0] == "1> Title"


def test_nq_reads_train_lines_only_until_enough_text(tmp_path):
    write_nq(tmp_path)
    assert qa.load("nq", limit=1, data_dir=tmp_path, distractor_chars=5).distractors == ["Lorem ipsum dolor sit amet"]


# -- the hub (datasets.load_dataset replaced by in-memory splits) -----------------------------------


def test_squad_from_the_hub(monkeypatch):
    import datasets

    splits = {
        "validation": [
            {
                "id": "a",
                "context": "C1",
                "question": "Q1",
                "answers": {"text": ["four words are too"], "answer_start": [0]},
            },
            {"id": "b", "context": "C1", "question": "Q2", "answers": {"text": [], "answer_start": []}},
            {
                "id": "c",
                "context": "C2",
                "question": "Q3",
                "answers": {"text": ["Denver Broncos", "x"], "answer_start": [0]},
            },
            {"id": "d", "context": "C2", "question": "Q4", "answers": {"text": ["1990"], "answer_start": [0]}},
        ],
        "train": [{"context": "T1"}, {"context": "T1"}, {"context": "T2"}],
    }
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split, **kw: calls.append(hub_id) or splits[split])
    monkeypatch.setattr(qa.hub, "reachable", lambda: True)
    data = qa.load("squad", limit=5)
    assert set(calls) == {"rajpurkar/squad_v2"}
    assert data.samples == [qa.Sample("c", "C2", "Q3", "Denver Broncos"), qa.Sample("d", "C2", "Q4", "1990")]
    assert data.distractors == ["T1", "T2"]
    assert [s.id for s in qa.load("squad", limit=1).samples] == ["c"]


def nq_hub_example(example_id: str, short: tuple[int, int] | None, as_lists: bool) -> dict:
    """The hub's NQ format; sequences of structs come as dicts of lists (as_lists) or lists of dicts."""
    tokens = {"token": [t for t, _ in PAGE], "is_html": [h for _, h in PAGE]}
    shorts = {"start_token": [short[0]], "end_token": [short[1]], "text": ["x"]} if short else {"start_token": []}
    annotation = {"id": "a", "long_answer": {"start_token": 0, "end_token": 8}, "short_answers": shorts}
    annotations = {k: [v] for k, v in annotation.items()} if as_lists else [annotation]
    return {
        "id": example_id,
        "question": {"text": "q" + example_id},
        "document": {"tokens": tokens},
        "annotations": annotations,
    }


def test_nq_from_the_hub(monkeypatch):
    import datasets

    splits = {
        "validation": [
            nq_hub_example("1", None, True),
            nq_hub_example("2", (1, 2), True),
            nq_hub_example("3", (2, 7), False),
        ],
        "train": [nq_hub_example("9", None, False)],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split, streaming: splits[split])
    monkeypatch.setattr(qa.hub, "reachable", lambda: True)
    data = qa.load("nq", limit=5, distractor_chars=100)
    # no short answer (1) and a five-word answer (3) are left out
    assert data.samples == [qa.Sample("2", "Paris is the capital of France", "q2", "Paris")]
    assert data.distractors == ["Paris is the capital of France"]


def test_an_unreachable_hub_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(qa.hub, "reachable", lambda: True)  # reachable, and the download fails anyway
    with pytest.raises(qa.DataError, match="cannot load rajpurkar/squad_v2 .*no network.*--data-dir"):
        qa.load("squad", limit=5)


# -- synthetic ---------------------------------------------------------------------------------------


def test_synthetic_facts_have_unique_answers_in_their_evidence():
    data = qa.synthetic(400, distractor_chars=20_000)
    answers = [s.answer for s in data.samples]
    assert len(set(answers)) == 400 and all(re.fullmatch(r"\d{4}", a) for a in answers)
    assert len({s.question for s in data.samples}) == 400
    for s in data.samples:
        assert s.context.count(s.answer) == 1
        entity = re.fullmatch(r"What is the .+ of the (.+)\?", s.question)[1]
        assert f"of the {entity} is {s.answer}." in s.context


def test_synthetic_distractors_are_fact_free_prose():
    data = qa.synthetic(50, distractor_chars=30_000)
    assert sum(map(len, data.distractors)) >= 30_000
    text = " ".join(data.distractors)
    assert not re.search(r"\d", text)
    assert not any(s.question.split(" of the ")[1].split()[0] in text for s in data.samples)


def test_synthetic_samples_do_not_depend_on_the_limit():
    assert qa.synthetic(3, 0).samples == qa.synthetic(30, 0).samples[:3]
    assert qa.load("synthetic", limit=3, distractor_chars=500).distractors == qa.synthetic(7, 500).distractors
    with pytest.raises(qa.DataError, match="fewer than --limit"):
        qa.synthetic(10**6, 0)


def test_reading_from_the_hub_fails_in_one_line_that_says_what_to_do_instead(monkeypatch):
    from tasks import samples

    monkeypatch.setattr(samples.hub, "offline", lambda: False)
    monkeypatch.setattr(samples.hub, "reachable", lambda: False)
    with pytest.raises(qa.DataError, match=r"the hub \(.*\) is unreachable: use the files"):
        with samples.from_hub("org/set", "use the files"):
            pass
    monkeypatch.setattr(samples.hub, "reachable", lambda: True)
    with pytest.raises(
        qa.DataError, match=r"^cannot load org/set from the hub \(OSError: no route to host\); use the files$"
    ):
        with samples.from_hub("org/set", "use the files"):
            raise OSError("no route\n   to host")
