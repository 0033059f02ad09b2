"""`bench retention`'s plan: shards, pieces that land on the distances, distance accounting, prompts per protocol."""

from __future__ import annotations

import importlib
import random
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from mplus_cli.app import app
from tasks import data as qa
from tasks.plan import (
    AUTHORS,
    CLEAN,
    Planner,
    Sweep,
    authors_unrelated,
    check_points,
    parse_shard,
    piece_sizes,
    protocol_for,
    sample_seed,
    shard_slice,
    split_evidence,
)
from tasks.results import ResultsLog
from tasks.retention import Runner

runner = CliRunner()
DECODING = importlib.import_module("model.core.generate")  # the module: model.generate is the function


def mplus(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


# -- pieces ------------------------------------------------------------------------------------------


def test_parse_shard():
    assert parse_shard("1/1") == (1, 1)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("3/2", "0/2", "1/0", "2", "a/b", "1/2/3", "-1/2"):
        with pytest.raises(ValueError, match="bad shard"):
            parse_shard(bad)


@pytest.mark.parametrize("count", [0, 1, 5, 10, 11])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_the_samples_in_order(count, n):
    samples = [qa.Sample(str(i), "c", "q", "a") for i in range(count)]
    slices = [shard_slice(samples, i, n) for i in range(1, n + 1)]
    assert sum(slices, []) == samples  # concatenation in shard order gives back every sample once
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_piece_sizes_land_on_the_points_with_whole_chunks_and_a_cut_one():
    assert piece_sizes([0, 1000, 4000], 512) == [[], [512, 488], [512] * 5 + [440]]
    assert piece_sizes([300, 1324], 512) == [[300], [512, 512]]
    assert piece_sizes([520, 1545], 512) == [[504, 16], [512, 497, 16]]  # a rest under 16 takes it from before
    check_points([0, 16, 1000])
    for bad in ([0, 10], [5], [-16, 0]):
        with pytest.raises(ValueError, match="16 tokens apart"):
            check_points(bad)


def test_split_evidence():
    assert [len(c) for c in split_evidence(list(range(1100)), 512)] == [512, 512, 76]
    assert [len(c) for c in split_evidence(list(range(1030)), 512)] == [512, 518]  # a 6-token tail joins
    assert [len(c) for c in split_evidence(list(range(20)), 512)] == [20]


def test_authors_distractors_concatenate_to_768_then_cut_to_512(tiny):
    tok = tiny.tokenizer  # bytes: one token per character here
    passages = ["a" * 300, "b" * 300, "c" * 300, "d" * 100, "e" * 900, "f" * 10]
    texts = list(authors_unrelated(passages, tok, nq=False))
    # 300 -> 601 -> 902 (>= 768, cut to 512); then d (100) -> 1001 (cut); then f alone
    assert texts == [
        ("a" * 300 + " " + "b" * 300 + " " + "c" * 300)[:512],
        ("d" * 100 + " " + "e" * 900)[:512],
        "f" * 10,
    ]
    # NQ: joined while <= 512 tokens
    assert [len(t) for t in authors_unrelated(["x" * 512, "y" * 10, "z" * 10], tok, nq=True)] == [512, 10]


# -- distance accounting -------------------------------------------------------------------------------


def test_distances_are_model_tokens_injected_after_the_evidence(word_model, tmp_path, monkeypatch):
    injected: list[list[int]] = []
    inject, inject_batch = word_model.inject, word_model.inject_batch
    monkeypatch.setattr(word_model, "inject", lambda state, ids: injected.append(ids.tolist()) or inject(state, ids))
    monkeypatch.setattr(  # the distractors: one batch of chunks per step, a chunk per sample (one sample here)
        word_model, "inject_batch", lambda states, ids: injected.extend(ids.tolist()) or inject_batch(states, ids)
    )
    data = qa.synthetic(2, distractor_chars=60_000)
    sweep = Sweep(data, CLEAN, [0, 700, 2000], seed=3)
    log = ResultsLog(tmp_path / "results.csv")
    Runner(word_model, "words", sweep, log).run(data.samples)

    tok = word_model.tokenizer
    stream = sum((tok.encode(passage + "\n\n") for passage in data.distractors), [])  # source order
    pool = [stream[i : i + 512] for i in range(0, 5 * 512, 512)]  # 2 + 3 chunks per sample
    for sample in data.samples:
        evidence = tok.encode(sample.context)
        assert injected.pop(0) == evidence  # one evidence chunk (< 512 words), then the distractors
        chunks = [injected.pop(0) for _ in range(2 + 3)]  # 700 in 2 chunks, then 1300 more in 3 (<= 512 each)
        assert [len(c) for c in chunks] == [512, 188, 512, 512, 276]
        # pool chunks in this sample's seeded order, each gap's last one cut
        order = random.Random(sample_seed(3, sample.id)).sample(range(5), 5)
        assert chunks == [pool[i][: len(c)] for i, c in zip(order, chunks, strict=True)]
        got = [(int(r["distance_tokens"]), int(r["n_distractors"])) for r in log.rows if r["sample_id"] == sample.id]
        assert got == [(0, 0), (700, 2), (2000, 5)]
    assert injected == []


def test_the_distractor_rows_of_a_training_free_model_are_encoded_once_and_change_no_answer(tmp_path, monkeypatch):
    """Pool chunks encoded once per run (not per sample) and cut to a prefix give the rows, predictions and
    survival of encoding every chunk when it is injected."""
    lm = mp.load("tiny-free-mplus")
    data = qa.synthetic(3, distractor_chars=40_000)
    sweep = Sweep(data, CLEAN, [0, 300, 1000, 2500], seed=1, chunk_tokens=128)
    every_time = ResultsLog(tmp_path / "a.csv")
    Runner(lm, "m", sweep, every_time).run(data.samples)
    calls = []
    delta = lm.compute_delta
    monkeypatch.setattr(lm, "compute_delta", lambda ids, state: calls.append(len(ids)) or delta(ids, state))
    once = ResultsLog(tmp_path / "b.csv")
    runner = Runner(lm, "m", sweep, once, cache_dir=tmp_path / "cache")
    runner.run(data.samples)
    pool = runner.planner.pool
    evidence = sum(len(runner.planner.evidence(s)) for s in data.samples)
    assert len(calls) == len(pool) + evidence  # each distractor chunk once, then each sample's evidence
    assert runner.encoded_pool() is not None and len(pool) == 3 + 6 + 12  # 300, 700 and 1500 tokens in chunks of 128
    strip = lambda r: {k: v for k, v in r.items() if k != "latency_ms"}  # noqa: E731
    assert [strip(r) for r in once.rows] == [strip(r) for r in every_time.rows]


def test_the_authors_protocol_asks_after_the_distractor_that_reaches_each_point(tiny, tmp_path):
    data = qa.synthetic(2, distractor_chars=20_000)
    sweep = Sweep(data, AUTHORS, [0, 600, 1000, 1500])
    log = ResultsLog(tmp_path / "results.csv")
    Runner(tiny, "tiny", sweep, log, memory_dir=tmp_path / "memory").run(data.samples)
    got = [(int(r["distance_tokens"]), int(r["n_distractors"])) for r in log.rows if r["sample_id"] == "syn-00000"]
    # byte tokens: every distractor is cut to 512, so 600 and 1000 both need 2 (one question), 1500 needs 3
    assert got == [(0, 0), (1024, 2), (1536, 3)]
    assert [p.name for p in (tmp_path / "memory").iterdir()] == ["after-2"]  # only the latest carried memory


def test_prompts_per_protocol(tiny, monkeypatch, chat_template):
    sample = qa.Sample("s", "x" * 600, "Where is it", "here")
    data = qa.QAData("nq", [sample], [], "test")
    authors, clean = (
        Planner(Sweep(data, protocol_for("authors", "nq"), [0]), tiny.tokenizer),
        Planner(Sweep(data, CLEAN, [0]), tiny.tokenizer),
    )
    assert tiny.tokenizer.decode(authors.question(sample)) == "Questions: Where is it? Answer:"
    assert [tiny.tokenizer.decode(c.tolist()) for c in authors.evidence(sample)] == [("Context: " + "x" * 600)[:512]]
    assert tiny.tokenizer.decode(clean.question(sample)) == "Question: Where is it\nAnswer:"
    assert [len(c) for c in clean.evidence(sample)] == [512, 88]  # all of the evidence, in chunks
    prefixed = qa.Sample("n", "It is here.", "Where is it", "here", answer_prefix="It is")
    assert tiny.tokenizer.decode(clean.question(prefixed)) == "Question: Where is it\nAnswer: It is"
    chat = Planner(Sweep(data, replace(CLEAN, chat=True), [0]), tiny.tokenizer)
    monkeypatch.setattr(tiny.tokenizer, "chat_template", chat_template, raising=False)
    assert tiny.tokenizer.decode(chat.question(prefixed)) == "<u>Where is it</u><a>It is"


def test_every_clean_question_is_answered_in_16_tokens():  # a needle's too: its answer prefix is given
    assert [protocol_for("clean", name).max_new_tokens for name in ("squad", "news", "niah")] == [16, 16, 16]
    assert protocol_for("authors", "squad").max_new_tokens == 10


def test_chat_asks_the_bare_question_in_the_chat_template(tmp_path):
    tokenizer = mp.load("tiny").tokenizer
    tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    sample = qa.Sample("s", "some context", "Where is it?", "here")
    planner = Planner(Sweep(qa.QAData("synthetic", [sample], [], "test"), replace(CLEAN, chat=True), [0]), tokenizer)
    assert tokenizer.decode(planner.question(sample)) == "<u>Where is it?</u><a>"
    args = ["--model", "tiny", "--dataset", "synthetic", "--max-distance", "1k", "--chat", "-o", tmp_path / "out"]
    result = mplus("bench", "retention", *args)
    assert result.exit_code == 2 and "no chat template: drop --chat" in result.output
    args.remove("--chat")  # a run that stopped before its first result is simply run again
    assert mplus("bench", "retention", *args, "--limit", "1").exit_code == 0


def test_full_context_puts_everything_in_the_prompt_cut_to_the_window(tiny, tmp_path, monkeypatch):
    prompts, states = [], []
    generate = mp.generate

    def spy(lm, state, prompt, settings, **options):
        prompts.append(list(prompt))
        states.append(state)
        return generate(lm, state, prompt, settings, **options)

    monkeypatch.setattr(DECODING, "generate", spy)  # what a question of a batch of one runs
    data = qa.synthetic(1, distractor_chars=40_000)
    sweep = Sweep(data, CLEAN, [0, 2000, 6000], controls=("full-context",))
    run = Runner(tiny, "tiny", sweep, ResultsLog(tmp_path / "results.csv"))
    rows = run.full_context_unit(data.samples[0])
    plan = Planner(sweep, tiny.tokenizer)
    evidence, question = torch.cat(plan.evidence(data.samples[0])).tolist(), plan.question(data.samples[0])
    distractors = torch.cat([c for stage in plan.stages(data.samples[0]) for c in stage.chunks]).tolist()
    assert prompts[0] == evidence + question
    assert prompts[1] == evidence + distractors[:2000] + question
    # 6000 tokens do not fit the 4096-token window: the context keeps its last 4096 - question - 16 tokens
    assert prompts[2] == (evidence + distractors)[-(4096 - len(question) - 16) :] + question
    assert all(not s.initialized and s.rows_per_layer == 0 for s in states)  # no memory prefix at all
    assert [(r["control"], r["distance_tokens"], r["n_distractors"]) for r in rows] == [
        ("full-context", 0, 0),
        ("full-context", 2000, 4),
        ("full-context", 6000, 12),
    ]
