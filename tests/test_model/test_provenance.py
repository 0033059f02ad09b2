"""Row provenance: every short-term and long-term row maps to the injection, layer and position that wrote it,
through drops, LTM merges, save/load, sessions, forks and checkpoints; retrieval reports the rows it read."""

from __future__ import annotations

import json

import pytest
import torch

import model as mp
from model import store as st
from model.memory.provenance import Origins, retrievals, share, survival
from model.text.tokenizer import encode

PRESETS = ["tiny", "tiny-mplus", "tiny-free", "tiny-free-mplus"]


@pytest.fixture(scope="module")
def models() -> dict[str, mp.MemoryLLM]:
    torch.set_num_threads(1)
    return {name: mp.load(name) for name in PRESETS}


def chunk(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def replay(lm: mp.MemoryLLM, state: mp.MemoryState, chunks: list[torch.Tensor]) -> dict[int, tuple[int, int, int]]:
    """Inject `chunks`, noting by hand where each new row id came from: {row id: (injection, layer, position)}."""
    written = {}
    for ids in chunks:
        result = lm.inject(state, ids)
        for layer, layer_ids in enumerate(result.row_ids.tolist()):
            for position, row_id in enumerate(layer_ids):
                written[row_id] = (state.injections, layer, position)
    return written


def live_ids(state: mp.MemoryState) -> torch.Tensor:
    """Every row id the state holds: short-term rows, LTM rows and cached dropped rows."""
    return state.saved_row_ids()


def expected(written: dict[int, tuple[int, int, int]], ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([written.get(i, (0, -1, -1)) for i in ids.tolist()])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_row_maps_to_what_wrote_it_through_drops_merges_and_save_load(tmp_path, models, preset):
    lm = models[preset]
    state = lm.new_state(seed=1)
    written = replay(lm, state, [chunk(40, i) for i in range(14)])
    ids = live_ids(state)
    found = state.origins.lookup(ids)
    assert torch.equal(found, expected(written, ids))
    assert (found[:, 0] > 0).any() and len(state.origins) <= 14 * lm.cfg.num_layers  # O(injections x layers)
    if state.ltm is not None:
        assert any(state.ltm.sizes())  # rows did move to the long-term memory
    state.save(tmp_path / "saved")
    loaded = mp.MemoryState.load(tmp_path / "saved")
    assert torch.equal(loaded.origins.lookup(live_ids(loaded)), found)  # same rows, same order, new ids
    assert torch.equal(state.clone().origins.lookup(ids), found)


@pytest.mark.parametrize("preset", ["tiny", "tiny-free-mplus"])
def test_sessions_forks_and_checkpoints_keep_the_origins(tmp_path, models, preset):
    lm = models[preset]
    session = st.Session.create(tmp_path / "store", "s", lm.initial_state, st.binding(lm, preset), 0, torch.float32)
    with session.writer() as writer:
        state = writer.load_state(lm.initial_state)
        written = {}
        for i in range(6):
            result = writer.inject(lm, state, chunk(40, i))
            written |= {
                r: (state.injections, l, j) for l, ids in enumerate(result.row_ids.tolist()) for j, r in enumerate(ids)
            }
            writer.commit(state)
    fork = st.Session.open(tmp_path / "store", "s").fork("t")
    for opened in (st.Session.open(tmp_path / "store", "s"), fork):
        reopened = opened.load_state(lm.initial_state)
        ids = live_ids(reopened)
        assert torch.equal(reopened.origins.lookup(ids), expected(written, ids))
    mp.save_checkpoint(lm, reopened, tmp_path / "checkpoint")
    restored = mp.load(str(tmp_path / "checkpoint")).new_state()
    assert torch.equal(restored.origins.lookup(live_ids(restored)), reopened.origins.lookup(live_ids(reopened)))


def test_the_training_free_demo_maps_each_row_to_its_token(models):
    """For the training-free flavours position j is the j-th token of the chunk: its row is that token's
    layer input, computed alone."""
    lm = models["tiny-free"]
    state = lm.new_state()
    ids = chunk(24, 3)
    lm.inject(state, ids)
    origins = state.origins.lookup(state.memory_ids[1])  # layer 1
    alone = lm.layer_inputs(torch.cat([torch.tensor([lm.cfg.bos_token_id]), ids]))[1, 1:]  # [k, d]
    for row, (injection, layer, position) in zip(state.memory[1], origins.tolist(), strict=True):
        assert injection == 1 and layer == 1 and torch.allclose(row, alone[position])


@pytest.mark.parametrize("preset", ["tiny-mplus", "tiny-free-mplus"])
def test_retrievals_name_the_rows_a_question_read(models, preset):
    lm = models[preset]
    state = lm.new_state()
    for i in range(14):
        lm.inject(state, chunk(40, i))
    with retrievals(lm) as read:
        lm(chunk(6, 99)[None], state)
    assert sorted(read) == list(range(lm.cfg.num_layers))
    for layer, ids in read.items():
        candidates = torch.cat(
            [state.ltm.layers[layer].row_ids, state.ltm.bank.row_ids(state.ltm.cached_entries[layer])]
        )
        assert torch.isin(ids, candidates).all()
        n = len(state.ltm.layers[layer])
        assert ids.numel() == (lm.retrieved_rows if preset == "tiny-mplus" else min(lm.retrieved_rows, n))
        injections = state.origins.injections(ids)
        assert share(state.origins, ids, injections[:1]) == float((injections == injections[0]).float().mean())


def test_nested_observers_each_see_every_retrieval(models):
    """Provenance and parity both observe retrievals: an inner recording never hides them from an outer one,
    and the model is as before once both blocks end."""
    lm = models["tiny-mplus"]
    state = lm.new_state()
    for i in range(14):
        lm.inject(state, chunk(40, i))
    L = lm.cfg.num_layers
    with retrievals(lm) as outer, lm.recording_retrievals() as log:
        with retrievals(lm) as inner:
            lm(chunk(6, 99)[None], state)
        lm(chunk(6, 98)[None], state)  # the inner block has ended: the outer ones still see this question
    assert [layer for layer, _ in log] == [*range(L), *range(L)]
    assert sorted(inner) == sorted(outer) == list(range(L))
    assert all(torch.equal(inner[layer], found.row_ids) for layer, found in log[:L])
    assert all(torch.equal(outer[layer], found.row_ids) for layer, found in log[L:])
    assert lm.retrieval_observers == [] and "retrieve" not in vars(lm)


def test_of_rows_merges_consecutive_rows_into_runs():
    origins = torch.tensor([[3, 0, 0], [3, 0, 1], [3, 0, 2], [3, 1, 0], [0, -1, -1], [5, 0, 7]])
    runs = Origins.of_rows(torch.tensor([10, 11, 12, 13, 14, 20]), origins)
    assert runs.runs.tolist() == [[10, 3, 3, 0, 0], [13, 1, 3, 1, 0], [20, 1, 5, 0, 7]]
    assert torch.equal(
        runs.lookup(torch.tensor([12, 14, 20, 99])), torch.tensor([[3, 0, 2], [0, -1, -1], [5, 0, 7], [0, -1, -1]])
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_survival_fractions_equal_a_direct_count(models, preset):
    lm = models[preset]
    state = lm.new_state(seed=2)
    written = replay(lm, state, [chunk(40, i) for i in range(10)])
    evidence = torch.tensor([3, 4])
    rows = {r for r, (injection, _, _) in written.items() if injection in (3, 4)}
    per_layer = [sum(1 for r in rows if written[r][1] == layer) for layer in range(lm.cfg.num_layers)]

    def direct(ids_per_layer) -> float:
        held = [sum(i in rows for i in ids.tolist()) / n for ids, n in zip(ids_per_layer, per_layer, strict=True)]
        return sum(held) / len(held)

    found = survival(state, evidence)
    assert found["stm"] == pytest.approx(direct(state.memory_ids))
    if state.ltm is not None:
        assert found["ltm"] == pytest.approx(direct([layer.row_ids for layer in state.ltm.layers]))
        assert found["stm"] + found["ltm"] > 0


def test_ask_explain_names_the_injections_whose_rows_were_retrieved(tmp_path, models):
    """`ask --explain --json` on tiny-mplus: the retrieved shares equal a count over what the question read
    (recorded here in-process), and each named injection carries its source file and chunk."""
    from typer.testing import CliRunner

    from mplus_cli.app import app

    runner, root = CliRunner(), tmp_path / "store"
    files = []
    for i in range(3):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"Document {i} says the code is {4000 + i}. " + "Filler words go here. " * 30)
    for path in files:
        result = runner.invoke(app, ["inject", str(path), "-s", "s", "--store", str(root), "--model", "tiny-mplus"])
        assert result.exit_code == 0, result.output
    question = "What is the code?"
    args = ["ask", question, "-s", "s", "--store", str(root), "--max-new-tokens", "2", "--explain", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["answers"][0]["explain"]

    lm = models["tiny-mplus"]
    state = st.Session.open(root, "s").load_state(lm.initial_state)
    with retrievals(lm) as read:
        mp.generate(lm, state, encode(lm.tokenizer, question), mp.DecodeSettings(max_new_tokens=2))
    injections = torch.cat([state.origins.injections(ids) for ids in read.values()])
    named = [entry for entry in report["retrieved"] if entry["injection"] is not None]
    assert named and sum(entry["share"] for entry in report["retrieved"]) == pytest.approx(1.0, abs=1e-3)
    for entry in named:
        assert entry["share"] == pytest.approx(float((injections == entry["injection"]).float().mean()), abs=1e-4)
        if entry["injection"] > 0:
            assert entry["source"] in map(str, files) and 1 <= entry["chunk"] <= entry["chunks"]
            assert entry["snippet"]
    latest = report["short_term"][0]
    assert latest["injection"] == state.injections and latest["source"] == str(files[-1])
    assert latest["held"] == pytest.approx(survival(state, torch.tensor([state.injections]))["stm"], abs=1e-4)


def test_session_show_map_draws_the_composition_it_counts(tmp_path, models):
    from typer.testing import CliRunner

    from mplus_cli.app import app
    from mplus_cli.explain import composition

    lm = models["tiny-mplus"]
    state = lm.new_state()
    written = replay(lm, state, [chunk(40, i) for i in range(9)])
    shares = composition(state, list(state.memory_ids))
    for layer, ids in enumerate(state.memory_ids.tolist()):
        for injection in range(state.injections + 1):
            count = sum(written.get(i, (0,))[0] == injection for i in ids)
            assert shares[layer, injection] == pytest.approx(count / len(ids))

    root, text = tmp_path / "store", tmp_path / "notes.txt"
    text.write_text("Filler words for the memory map. " * 30)
    runner = CliRunner()
    assert (
        runner.invoke(app, ["inject", str(text), "-s", "s", "--store", str(root), "--model", "tiny-mplus"]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["session", "show", "s", "--store", str(root), "--map", str(tmp_path / "map.png"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["map"] == str(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_retention_bench_records_evidence_survival_and_plots_it(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from mplus_cli.app import app
    from tasks import results as res

    out = tmp_path / "run"
    args = ["bench", "retention", "--max-distance", "1k", "--limit", "2", "--model", "tiny-mplus", "--model", "tiny"]
    result = CliRunner().invoke(app, [*args, "--controls", "closed-book", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv", keep_default_na=False, dtype=str)
    memory, closed = rows[rows.control == "memory"], rows[rows.control == "closed-book"]
    assert (closed[list(res.SURVIVAL)] == "").all().all()
    assert memory.evidence_stm.astype(float).between(0, 1).all()
    assert (memory[memory.model == "tiny"].evidence_ltm == "").all()
    mplus_rows = memory[memory.model == "tiny-mplus"]
    assert mplus_rows.evidence_retrieved.astype(float).between(0, 1).all()
    assert (
        float(mplus_rows[mplus_rows.distance_tokens == "0"].evidence_stm.astype(float).min()) == 1.0
    )  # nothing dropped yet
    summary = pd.read_csv(out / "summary.csv")
    for (model, distance), group in memory.groupby(["model", "distance_tokens"]):
        line = summary[
            (summary.model == model) & (summary.control == "memory") & (summary.distance_tokens == int(distance))
        ]
        assert float(line.evidence_stm.iloc[0]) == pytest.approx(group.evidence_stm.astype(float).mean())
    rates = res.drop_rates([out])
    assert set(rates) == {"tiny"} and 0 < rates["tiny"][0] <= 1
    figure = res.figure(summary, drop_rates=rates)
    assert len(figure.axes) == 2
    assert "tiny: (1 - K/N)^s" in figure.axes[1].get_legend_handles_labels()[1]
