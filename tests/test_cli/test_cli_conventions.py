"""The CLI for people: models are discoverable, offline is first-class, one set of conventions, legible sessions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import typer
from typer.testing import CliRunner

import model as mp
from model import store as st
from model.zoo.checkpoint import resolve_checkpoint
from mplus_cli.app import app
from mplus_cli.output import human_bytes, human_count, plural
from mplus_cli.root import COMMANDS, load_command

runner = CliRunner()
ROOT = Path(__file__).parents[2]
TEXT = "Alice keeps the spare key under the blue flowerpot by the back door. " * 12  # 828 bytes: 828 tokens
NAMES = [  # every name --model takes, in the order `mplus models` lists them
    "tiny",
    "tiny-mplus",
    "tiny-free",
    "tiny-free-mplus",
    "smollm2-135m",
    "smollm2-135m-memoryllm",
    "memoryllm-7b",
    "memoryllm-8b",
    "memoryllm-8b-chat",
    "mplus-8b",
]
KINDS = ["memoryllm", "mplus", "memoryllm", "mplus", "mplus", "memoryllm", *["memoryllm"] * 3, "mplus"]
FLAVOURS = ["trained", "trained", "training-free", "training-free", "training-free", "training-free"] + ["trained"] * 4
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def mplus(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, an unreachable hub (a refused port) and an empty demo-model cache: nothing of this
    machine's own caches leaks into a test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MPLUS_CACHE", str(tmp_path / "models"))
    return cache


def cache_repo(cache: Path, repo_id: str, files: Path) -> Path:
    """`files` as the hub cache holds a downloaded repo: blobs by hash, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(files.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def cached_mplus_8b(hub_cache, tmp_path) -> Path:
    """The tiny-mplus preset saved as a checkpoint and cached as if it were YuWangX/mplus-8b."""
    lm = mp.load("tiny-mplus")
    mp.save_checkpoint(lm, lm.initial_state, tmp_path / "checkpoint")
    return cache_repo(hub_cache, "YuWangX/mplus-8b", tmp_path / "checkpoint")


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    return path


def inject(store: Path, text_file: Path, session: str, model: str = "tiny", *more: str) -> None:
    result = mplus("inject", text_file, "-s", session, "--store", store, "--model", model, *more)
    assert result.exit_code == 0, result.output


# -- 3. models are discoverable -------------------------------------------------------------------
def test_models_lists_every_name_with_kind_flavour_size_and_place(hub_cache):
    result = mplus("models", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)["models"]
    assert [m["name"] for m in listed] == NAMES
    assert [m["kind"] for m in listed] == KINDS and [m["flavour"] for m in listed] == FLAVOURS
    for entry in listed[:4]:  # the presets: parameters as the loaded model has them, built in, labelled
        assert entry["parameters"] == sum(p.numel() for p in mp.load(entry["name"]).parameters())
        assert entry["where"] == "built in" and entry["local"] and "untrained" in entry["label"]
    for entry in listed[6:]:  # the authors' checkpoints, not downloaded: where to get them
        assert entry["where"] == f"hub YuWangX/{entry['name']} (not downloaded)" and not entry["local"]
        assert entry["parameters"] is None and entry["bytes"] is None

    table = mplus("models").stdout.splitlines()
    assert table[0].split() == ["name", "kind", "flavour", "size", "where", "label"]
    assert [line.split()[0] for line in table[1:]] == NAMES
    assert "121.6k params" in table[1] and "137k params" in table[2]  # tiny: 121,600; tiny-mplus: 136,960


def test_models_finds_a_cached_checkpoint_without_the_network(cached_mplus_8b, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("mplus models reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    result = mplus("models", "--json")
    assert result.exit_code == 0, result.output
    entry = {m["name"]: m for m in json.loads(result.stdout)["models"]}["mplus-8b"]
    blobs = cached_mplus_8b.parent.parent / "blobs"
    assert entry["where"] == str(cached_mplus_8b) and entry["local"]
    assert entry["bytes"] == sum(p.stat().st_size for p in blobs.iterdir())
    assert entry["parameters"] == sum(p.numel() for p in mp.load("tiny-mplus").parameters())
    line = next(line for line in mplus("models").stdout.splitlines() if line.startswith("mplus-8b "))
    assert str(cached_mplus_8b) in line and "not downloaded" not in line


@pytest.mark.parametrize(("typo", "closest"), [("tiny-mplsu", "tiny-mplus"), ("memoryllm-8bb", "memoryllm-8b")])
def test_an_unknown_model_lists_every_model_and_the_closest(store, text_file, typo, closest):
    result = mplus("inject", text_file, "-s", "s", "--store", store, "--model", typo)
    assert result.exit_code == 3 and result.stdout == ""
    line = result.stderr.strip()
    assert len(result.stderr.splitlines()) == 1 and f"did you mean {closest}?" in line
    assert all(name in line for name in NAMES) and "mplus models" in line
    assert not store.exists()


def test_version_prints_the_package_version():
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    result = mplus("--version")
    assert result.exit_code == 0 and result.stdout == f"mplus {version}\n"


# -- 4. offline is first-class --------------------------------------------------------------------
@pytest.fixture
def silent_hub(monkeypatch):
    """A hub endpoint that accepts connections and never answers (the slow way a network fails)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


@pytest.mark.parametrize("hub", ["refused", "silent", "offline"])
def test_a_hub_model_without_the_hub_is_one_line_within_seconds(hub_cache, store, text_file, request, monkeypatch, hub):
    if hub == "silent":
        request.getfixturevalue("silent_hub")
    if hub == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    result = mplus("inject", text_file, "-s", "s", "--store", store, "--model", "memoryllm-8b")
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and result.stdout == "" and elapsed < 6, (elapsed, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mplus: error: cannot load model 'memoryllm-8b': "), lines
    assert "download YuWangX/memoryllm-8b`" in lines[0] and "local checkpoint directory" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "HF_HUB_OFFLINE=1") in lines[0]
    assert not store.exists()


@pytest.mark.parametrize("hub", ["refused", "offline"])
def test_without_the_hub_a_cached_checkpoint_is_used(cached_mplus_8b, monkeypatch, hub):
    if hub == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("mplus-8b") == cached_mplus_8b
    assert mp.load("mplus-8b", tokenizer=False).cfg.fingerprint() == mp.load("tiny-mplus").cfg.fingerprint()


def test_the_console_entry_point_honours_hf_hub_offline(tmp_path, text_file):
    """A real process: HF_HUB_OFFLINE=1 in the environment, one line, no hub-client text."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    command = [sys.executable, "-m", "mplus_cli", "inject", str(text_file), "-s", "s", "--store", str(tmp_path / "st")]
    proc = subprocess.run([*command, "--model", "mplus-8b"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "download YuWangX/mplus-8b" in proc.stderr


@pytest.mark.parametrize("hub", ["refused", "silent", "offline"])
def test_a_hub_dataset_without_the_hub_is_one_line_within_seconds(
    hub_cache, tmp_path, request, monkeypatch, hub, caplog
):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    if hub == "silent":
        request.getfixturevalue("silent_hub")
    if hub == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    start = time.monotonic()
    result = mplus("bench", "retention", "--dataset", "squad", "--max-distance", "1k", "--limit", 1, "-o", out)
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and result.stdout == "" and elapsed < 6, (elapsed, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--data-dir" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert "Retrying" not in caplog.text and not out.exists()


# -- 5. conventions -------------------------------------------------------------------------------
def commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every command under the click group `group` (the root loads each by name)."""
    found, ctx = [], typer.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        found += commands(command, (*path, name)) if hasattr(command, "commands") else [(*path, name)]
    return found


ALL_COMMANDS = commands(typer.main.get_command(app))


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_every_help_has_an_example_and_no_noise(path):
    result = mplus(*path, "--help")
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s+Examples?: mplus " + " ".join(path), result.stdout, re.M), result.stdout
    assert "<bool>" not in result.stdout and "\u2026" not in result.stdout  # no flag types, no truncation


def test_environment_variables_and_defaults_show_in_full():
    inject_help = " ".join(mplus("inject", "--help").stdout.split())
    assert "[env var: MPLUS_HOME]" in inject_help and "[env var: MPLUS_MODEL]" in inject_help
    assert "default: ~/.cache/mplus/sessions)" in inject_help
    assert "[env var: MPLUS_DATA_DIR]" in mplus("bench", "retention", "--help").stdout


def test_mplus_home_is_the_store(store, text_file, monkeypatch):
    inject(store, text_file, "h")
    monkeypatch.setenv("MPLUS_HOME", str(store))
    listing = json.loads(mplus("session", "ls", "--json").stdout)
    assert listing["store"] == str(store) and [row["session"] for row in listing["sessions"]] == ["h"]


def test_debug_and_json_go_before_or_after_the_command(store, text_file):
    inject(store, text_file, "s")
    for args in (["--json", "session", "ls", "--store", store], ["session", "ls", "--store", store, "--json"]):
        result = mplus(*args)
        assert result.exit_code == 0 and json.loads(result.stdout)["sessions"][0]["session"] == "s"
    for args in (["--debug", "session", "show", "nobody"], ["session", "show", "nobody", "--debug"]):
        result = mplus(*args, "--store", store)
        assert result.exit_code == 3 and "Traceback" in result.stderr
    quiet = mplus("session", "show", "nobody", "--store", store)
    assert quiet.exit_code == 3 and "Traceback" not in quiet.stderr  # --debug does not stick to the next call
    asked = mplus("ask", "Where?", "--session", "s", "--store", store, "--max-new-tokens", 2, "--debug", "--json")
    assert asked.exit_code == 0 and len(json.loads(asked.stdout)["token_ids"]) <= 2
    no_json = mplus("--json", "parity", ROOT / "tests" / "fixtures" / "official" / "memoryllm")
    assert no_json.exit_code == 2 and "no --json output" in no_json.stderr
    assert "--json (before or after" in mplus("session", "ls", "--help").stdout  # a command with one says so
    assert "--json" not in mplus("parity", "--help").stdout


@pytest.mark.parametrize("spelling", ["-o", "--output", "--out"])
def test_export_writes_to_its_output_option_in_each_spelling(store, text_file, tmp_path, spelling):
    inject(store, text_file, "s")
    out = tmp_path / "memory.safetensors"
    result = mplus("export", "-s", "s", "--store", store, spelling, out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".json").is_file()


@pytest.mark.parametrize("spelling", ["-o", "--output", "--output-path"])
def test_bench_retention_writes_to_its_output_option_in_each_spelling(tmp_path, spelling):
    out = tmp_path / "run"
    args = ["bench", "retention", "--dataset", "synthetic", "--max-distance", "64", "--limit", 1, "--model", "tiny"]
    result = mplus(*args, spelling, out)
    assert result.exit_code == 0, result.output
    assert (out / "results.csv").is_file()
    assert "(1 sample," in result.stdout  # "exact hit by distance (1 sample, synthetic, clean protocol)"
    plot = mplus("bench", "plot", out, "--output", tmp_path / "plot.png")
    assert plot.exit_code == 0 and (tmp_path / "plot.png").is_file(), plot.output


@pytest.mark.parametrize(("command", "old"), [(["export"], "--out "), (["bench", "retention"], "--output-path")])
def test_the_old_output_spellings_stay_out_of_the_help(command, old):
    shown = mplus(*command, "--help").stdout
    assert "-o, --output <path>" in shown and old not in shown


def test_counts_and_sizes_read_the_way_people_write_them():
    assert [plural(1, "chunk"), plural(2, "chunk"), plural(1234, "token")] == ["1 chunk", "2 chunks", "1,234 tokens"]
    assert [plural(1, "entry", "entries"), plural(0, "entry", "entries")] == ["1 entry", "0 entries"]
    sizes = [512, 1500, 42_300, 540_000_000, 16_100_000_000]
    assert [human_bytes(n) for n in sizes] == ["512 B", "1.5 kB", "42.3 kB", "540 MB", "16.1 GB"]
    assert [human_count(n) for n in (950, 121_600, 134_515_008)] == ["950", "121.6k", "134.5M"]


def test_one_chunk_is_a_chunk(store, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(TEXT)
    result = mplus("inject", path, "-s", "one", "--store", store, "--chunk-tokens", 1024)
    assert result.exit_code == 0 and f"injected {len(TEXT)} tokens in 1 chunk into" in result.stdout, result.stdout
    assert "1 chunks" not in result.stdout


def test_a_note_gets_its_own_line_under_a_progress_bar(tmp_path):
    """At a terminal, bench retention's progress bar is live when the model is loaded: the model's note must
    not be glued to the bar's line."""
    import pty

    parent, child = pty.openpty()
    env = os.environ | {"TERM": "xterm", "COLUMNS": "100", "LINES": "30"}
    args = ["bench", "retention", "--dataset", "synthetic", "--max-distance", "64", "--limit", "1"]
    command = [sys.executable, "-m", "mplus_cli", *args, "--model", "tiny", "-o", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    output = b""
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(parent)
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    segments = re.split(r"[\r\n]", ANSI.sub("", output.decode(errors="replace")))
    notes = [s for s in segments if "note: model is" in s]
    assert notes and all(s.startswith("note: model is untrained") for s in notes), notes


# -- 6. sessions are legible ----------------------------------------------------------------------
def test_session_ls_is_a_table_with_json_numbers(store, text_file):
    inject(store, text_file, "a")
    inject(store, text_file, "b", "tiny-free-mplus")
    listing = json.loads(mplus("session", "ls", "--store", store, "--json").stdout)["sessions"]
    assert [row["session"] for row in listing] == ["a", "b"]
    for row, kind, flavour in zip(listing, ["memoryllm", "mplus"], ["trained", "training-free"], strict=True):
        assert row["kind"] == kind and row["flavour"] == flavour and row["busy"] is False
        assert row["tokens"] == len(TEXT) and row["injections"] == 2  # 828 byte tokens: chunks of 512 and 316
        assert row["disk_bytes"] == sum(p.stat().st_size for p in (store / row["session"]).iterdir() if p.is_file())
        assert row["updated"] == st.Session.open(store, row["session"]).manifest["updated"]
    lines = mplus("session", "ls", "--store", store).stdout.splitlines()
    header = ["session", "model", "memory", "flavour", "injections", "tokens", "size", "updated", "busy"]
    assert lines[0].split() == header
    a = lines[1].split()
    assert a[:6] == ["a", "tiny", "memoryllm", "trained", "2", "828"] and a[-1] == "no"
    assert re.fullmatch(r"\d+(\.\d+)?", a[6]) and a[7] in ("B", "kB", "MB")  # e.g. "1.23 MB"
    assert lines[2].split()[:4] == ["b", "tiny-free-mplus", "mplus", "training-free"]


def test_a_session_a_writer_holds_is_busy(store, text_file):
    inject(store, text_file, "a")
    assert st.Session.open(store, "a").busy() is False
    with st.Session.open(store, "a").writer():
        assert st.Session.open(store, "a").busy() is True
        assert json.loads(mplus("session", "ls", "--store", store, "--json").stdout)["sessions"][0]["busy"] is True
        assert mplus("session", "ls", "--store", store).stdout.splitlines()[1].split()[-1] == "yes"
        assert json.loads(mplus("session", "show", "a", "--store", store, "--json").stdout)["busy"] is True
    assert st.Session.open(store, "a").busy() is False  # the probe never kept the lock


def test_session_show_summarises_short_and_long_term_memory(store, text_file):
    inject(store, text_file, "m", "tiny-mplus", "--chunk-tokens", 64)
    shown = json.loads(mplus("session", "show", "m", "--store", store, "--json").stdout)
    memory = shown["memory"]
    sizes = st.Session.open(store, "m").load_state(mp.load("tiny-mplus").initial_state).ltm.sizes()
    assert memory["ltm_rows"] == sizes and (memory["ltm_rows_min"], memory["ltm_rows_max"]) == (min(sizes), max(sizes))
    assert memory["short_term_rows"] == memory["short_term_capacity"] == 128  # tiny-mplus: 8 blocks of 16, full
    assert shown["flavour"] == "trained" and isinstance(shown["disk_bytes"], int)
    text = mplus("session", "show", "m", "--store", store).stdout
    assert "short-term  128 of 128 rows per layer (2 layers of width 64)" in text
    per_layer = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}\u2013{max(sizes)}"
    assert f"long-term   {per_layer} rows per layer" in text and str(sizes) not in text
    assert "storage     float32 rows, " in text and re.search(r"\d (B|kB|MB) on disk", text)
    assert "13 chunks from 1 source\n" in text  # 828 tokens in chunks of 64: 12 and a 60-token tail


def test_session_show_of_a_training_free_session_counts_rows_used_of_capacity(store, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 40)  # 40 tokens: 40 rows of tiny-free's 64 per layer
    assert mplus("inject", path, "-s", "f", "--store", store, "--model", "tiny-free").exit_code == 0
    memory = json.loads(mplus("session", "show", "f", "--store", store, "--json").stdout)["memory"]
    assert (memory["short_term_rows"], memory["short_term_capacity"]) == (40, 64)
    text = mplus("session", "show", "f", "--store", store).stdout
    assert "short-term  40 of 64 rows per layer" in text and "training-free" in text
    assert "40 tokens in 1 chunk from 1 source" in text


def test_mplus_help_imports_no_torch_and_lists_every_command():
    """`mplus --help` loads no command (torch takes a second to import): the root lists them from its table,
    whose help lines are the commands' own."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mplus_cli.app import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "print(result.exit_code, sorted(m for m in ('torch', 'model', 'tasks') if m in sys.modules))\n"
        "print(result.stdout)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    first, *help_text = proc.stdout.splitlines()
    assert first == "0 []", proc.stdout + proc.stderr
    assert all(any(line.strip().startswith(name) for line in help_text) for name in COMMANDS)


def test_the_roots_table_of_commands_says_what_each_command_says():
    for name, (_, _, first_line) in COMMANDS.items():
        assert load_command(name).get_short_help_str(1000) == first_line, name
