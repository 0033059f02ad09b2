"""`mplus export` checks everything before it touches anything, replaces only its own earlier exports, and
writes private files; a checkpoint's index cannot lead outside its directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import token_ids
from safetensors.torch import save_file
from typer.testing import CliRunner

import model as mp
import model.zoo.checkpoint as ckpt
from model import store as st
from model.store.export import load_exported_memory
from mplus_cli.app import app

runner = CliRunner()
TEXTS = {
    "s": "Alice keeps the spare key under the blue flowerpot by the back door. " * 12,
    "t": "The lighthouse keeper paints the railing green every second spring. " * 12,
}


def mplus(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (itself included, symlinks not followed): kind, mode, content or link target."""
    paths = [root]
    for directory, dirs, files in os.walk(root):
        paths += [Path(directory, name) for name in dirs + files]
    entries = {}
    for path in paths:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = None
        entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), content)
    return entries


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with sessions `s` and `t` (different texts, so different memories)."""
    root = tmp_path_factory.mktemp("stores") / "store"
    for name, text in TEXTS.items():
        source = root.parent / f"{name}.txt"
        source.write_text(text)
        result = mplus("inject", source, "-s", name, "--store", root, "--model", "tiny", "--chunk-tokens", 256)
        assert result.exit_code == 0, result.output
    return root


def forbid_model_load(monkeypatch) -> None:
    """From here on loading the model fails the test: a refused export is refused before it loads one."""
    monkeypatch.setattr("mplus_cli.commands.export.load_bound_model", lambda *args: pytest.fail("the model was loaded"))


@pytest.fixture
def model_never_loads(monkeypatch) -> None:
    forbid_model_load(monkeypatch)


def export(store: Path, out: Path, *options: str, session: str = "s"):
    return mplus("export", "-s", session, "--store", store, "-o", out, *options)


def assert_refused(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    line = result.stderr.strip()
    assert line.startswith("mplus: error:") and "\n" not in line, line
    for word in words:
        assert word in line, line


def session_state(store: Path, name: str) -> mp.MemoryState:
    return st.Session.open(store, name).load_state(mp.load("tiny").initial_state)


# -- refused exports change nothing -----------------------------------------------------------------
refused_early = pytest.mark.usefixtures("model_never_loads")


@refused_early
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_user_json_beside_the_export_is_never_overwritten(store, tmp_path, force):
    (tmp_path / "notes.json").write_text('{"mine": true}')
    before = tree(tmp_path)
    result = export(store, tmp_path / "notes.safetensors", *force)
    assert_refused(result, 4, "notes.json", "is not the JSON manifest of an mplus export", "will not be replaced")
    assert tree(tmp_path) == before


@refused_early
@pytest.mark.parametrize("format", ["memory", "checkpoint"])
def test_force_never_replaces_a_user_directory(store, tmp_path, format):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "thesis.txt").write_text("years of work")
    before = tree(tmp_path)
    result = export(store, tmp_path / "somedir", "--format", format, "--force")
    assert_refused(result, 4, "somedir", f"is not an mplus {format} export", "will not be replaced")
    assert tree(tmp_path) == before


@refused_early
def test_a_json_output_name_is_refused_before_anything_is_deleted(store, tmp_path):
    (tmp_path / "cfg.json").write_text('{"lr": 0.1}')
    before = tree(tmp_path)
    assert_refused(export(store, tmp_path / "cfg.json", "--force"), 2, "cfg.json", "cfg.safetensors")
    assert tree(tmp_path) == before


def unrelated(tmp_path: Path, store: Path, kind: str) -> Path:
    """An existing entry at the output name that is not an earlier export of this tool."""
    out = tmp_path / "out.safetensors"
    if kind == "plain safetensors":
        save_file({"x": torch.zeros(2)}, out, metadata={"format": "pt"})
    elif kind == "text":
        out.write_text("not a tensor file")
    elif kind == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "symlink to an export":
        (tmp_path / "real").mkdir()
        assert export(store, tmp_path / "real" / "memory.safetensors").exit_code == 0
        out.symlink_to(tmp_path / "real" / "memory.safetensors")
    return out


@pytest.mark.parametrize("kind", ["plain safetensors", "text", "dangling symlink", "symlink to an export"])
def test_force_never_replaces_an_unrelated_file(store, tmp_path, kind, monkeypatch):
    out = unrelated(tmp_path, store, kind)
    before = tree(tmp_path)
    forbid_model_load(monkeypatch)
    assert_refused(export(store, out, "--force"), 4, str(out), "is not an mplus memory export", "will not be replaced")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("format", ["memory", "checkpoint"])
def test_without_force_an_earlier_export_is_kept(store, tmp_path, format, monkeypatch):
    out = tmp_path / ("memory.safetensors" if format == "memory" else "checkpoint")
    assert export(store, out, "--format", format).exit_code == 0
    before = tree(tmp_path)
    forbid_model_load(monkeypatch)
    assert_refused(export(store, out, "--format", format, session="t"), 4, str(out), "pass --force")
    assert tree(tmp_path) == before


def test_an_earlier_manifest_alone_still_needs_force(store, tmp_path):
    out = tmp_path / "memory.safetensors"
    assert export(store, out).exit_code == 0
    out.unlink()
    before = tree(tmp_path)
    assert_refused(export(store, out), 4, "memory.json", "pass --force")
    assert tree(tmp_path) == before
    assert export(store, out, "--force").exit_code == 0
    assert load_exported_memory(out)[1]["name"] == "s"


def test_a_checkpoint_directory_with_a_file_added_is_not_replaced(store, tmp_path, monkeypatch):
    out = tmp_path / "checkpoint"
    assert export(store, out, "--format", "checkpoint").exit_code == 0
    (out / "notes.txt").write_text("added by the user")
    before = tree(tmp_path)
    forbid_model_load(monkeypatch)
    assert_refused(export(store, out, "--format", "checkpoint", "--force"), 4, "is not an mplus checkpoint export")
    assert tree(tmp_path) == before


def inside_the_store(store: Path, tmp_path: Path, case: str) -> Path:
    if case == "the store root":
        return store
    if case == "a session directory":
        return store / "s"
    if case == "a session manifest":
        return store / "s" / "manifest.json"
    if case == "a new file in a session":
        return store / "s" / "memory.safetensors"
    if case == "through ..":
        (tmp_path / "elsewhere").mkdir()
        return tmp_path / "elsewhere" / ".." / ".." / store.parent.name / store.name / "s"
    if case == "through a symlinked parent":
        (tmp_path / "link").symlink_to(store)
        return tmp_path / "link" / "s"
    if case == "a symlink into the store":
        (tmp_path / "alias").symlink_to(store / "s")
        return tmp_path / "alias"
    assert case == "a directory holding the store"
    return store.parent


@refused_early
@pytest.mark.parametrize(
    "case",
    [
        "the store root",
        "a session directory",
        "a session manifest",
        "a new file in a session",
        "through ..",
        "through a symlinked parent",
        "a symlink into the store",
        "a directory holding the store",
    ],
)
@pytest.mark.parametrize("format", ["memory", "checkpoint"])
def test_targets_in_the_store_are_refused(store, tmp_path, case, format):
    out = inside_the_store(store, tmp_path, case)
    words = ["collide"] if format == "memory" and out.suffix == ".json" else ["session store", "choose"]
    before, outside = tree(store), tree(tmp_path)
    assert_refused(export(store, out, "--format", format, "--force"), 2, *words)
    assert tree(store) == before and tree(tmp_path) == outside
    assert mplus("session", "show", "s", "--store", store).exit_code == 0


@refused_early
def test_a_missing_parent_is_not_found(store, tmp_path):
    before = tree(tmp_path)
    assert_refused(export(store, tmp_path / "nope" / "memory.safetensors"), 3, "nope", "create it first")
    assert tree(tmp_path) == before


# -- what an export writes --------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["memory", "checkpoint"])
def test_force_replaces_an_earlier_export_with_the_new_one(store, tmp_path, format):
    out = tmp_path / ("memory.safetensors" if format == "memory" else "checkpoint")
    assert export(store, out, "--format", format).exit_code == 0
    result = export(store, out, "--format", format, "--force", session="t")
    assert result.exit_code == 0, result.output
    expected = session_state(store, "t").memory
    assert not torch.equal(expected, session_state(store, "s").memory)
    if format == "memory":
        assert torch.equal(load_exported_memory(out)[0].memory, expected)
        assert json.loads(out.with_suffix(".json").read_text())["session"]["name"] == "t"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json", "memory.safetensors"]
    else:
        assert torch.equal(mp.load(out).initial_state.memory, expected)
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp or trash left


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
@pytest.mark.parametrize("format", ["memory", "checkpoint"])
def test_exports_are_private_whatever_the_umask(store, tmp_path, umask, format):
    out = tmp_path / ("memory.safetensors" if format == "memory" else "checkpoint")
    previous = os.umask(umask)
    try:
        assert export(store, out, "--format", format).exit_code == 0
    finally:
        os.umask(previous)
    if format == "memory":
        files, directories = [out, out.with_suffix(".json")], []
    else:
        files, directories = [p for p in out.iterdir()], [out]
        assert len(files) >= 3  # weights, config.json, the marker (and the tokenizer)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o600)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in directories} <= {oct(0o700)}


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path, monkeypatch) -> tuple[mp.MemoryLLM, mp.MemoryState, Path]:
    model = mp.load("tiny")
    state = model.new_state()
    model.inject(state, token_ids(20))
    monkeypatch.setattr(ckpt, "SHARD_SIZE", 64 * 1024)
    return model, state, mp.save_checkpoint(model, state, tmp_path / "ckpt")


@pytest.mark.parametrize("escape", ["../outside.safetensors", "absolute", "symlink"])
def test_an_index_entry_leading_outside_the_checkpoint_is_refused(sharded, tmp_path, escape):
    _, _, directory = sharded
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(directory / shard, outside)
    name = {"../outside.safetensors": "../outside.safetensors", "absolute": str(outside), "symlink": "linked"}[escape]
    if escape == "symlink":
        (directory / "linked").symlink_to(outside)
    index["weight_map"][key] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(mp.CheckpointError) as err:
        mp.load(directory)
    assert f"maps {key} to {name}, outside the checkpoint directory" in str(err.value)


def test_a_hub_cache_snapshot_linking_into_its_blobs_loads(sharded, tmp_path):
    _, state, directory = sharded
    repo = tmp_path / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(directory.iterdir())):
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    assert len(json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert torch.equal(mp.load(snapshot).initial_state.memory, state.memory)


def test_save_checkpoint_marks_what_it_wrote(sharded, tmp_path):
    _, _, directory = sharded
    assert ckpt.is_saved_checkpoint(directory)
    listed = json.loads((directory / ckpt.SAVED_MARKER).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in directory.iterdir() if p.name != ckpt.SAVED_MARKER)
    (directory / "extra.txt").write_text("added")
    assert not ckpt.is_saved_checkpoint(directory)
    (directory / "extra.txt").unlink()
    config = directory / "config.json"
    shutil.move(config, tmp_path / "config.json")
    config.symlink_to(tmp_path / "config.json")
    assert not ckpt.is_saved_checkpoint(directory)
    config.unlink()
    shutil.move(tmp_path / "config.json", config)
    assert ckpt.is_saved_checkpoint(directory)
    (directory / ckpt.SAVED_MARKER).unlink()
    assert not ckpt.is_saved_checkpoint(directory)
