"""scripts/gpu-check.sh and its helper, on the CPU: the script parses, each part runs at small sizes, the report
computes the inject fraction of the matmul peak (a GPU run is the script's own job)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "official"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def run(gpu_check, tmp_path: Path, *args) -> dict:
    out = tmp_path / f"{args[0]}.json"
    assert gpu_check.main([*map(str, args), "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", ROOT / "scripts" / "gpu-check.sh"]).returncode == 0


@pytest.mark.parametrize("fixture", ["memoryllm", "mplus"])
def test_parity_replays_in_float32_and_bfloat16_on_the_device_given(gpu_check, tmp_path, fixture):
    part = run(gpu_check, tmp_path, "parity", FIXTURES / fixture)
    assert part["ok"] and part["float32"][fixture]["ok"] and part["bfloat16"][fixture]["ok"], part
    assert part["float32"][fixture]["worst"]["error_over_tolerance"] < 1
    assert 0 < part["bfloat16"][fixture]["worst"]["error_over_tolerance"] <= 1  # bf16 differs, within its bound


def test_the_matmul_peak_and_the_memory_step_run_small(gpu_check, tmp_path):
    matmul = run(gpu_check, tmp_path, "matmul", "--size", 64, "--repeats", 2)
    assert matmul["size"] == 64 and matmul["tflops"] > 0
    memory = run(gpu_check, tmp_path, "memory", "--shape", "tiny", "--ltm-rows", 64)
    for flavour in ("memoryllm", "mplus"):
        assert memory[flavour]["peak_mib"] is None and memory[flavour]["inject_tok_s"] > 0, memory  # no GPU here
    assert memory["mplus"]["paper_mb"] == 21_177.76 and memory["memoryllm"]["paper_mb"] == 21_176.24


def test_the_report_puts_inject_flops_over_the_matmul_peak(gpu_check, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    steps = [{"step": "parity", "rc": 0, "seconds": 9}, {"step": "speed", "rc": 0, "seconds": 90}]
    (work / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    inject = {"name": "inject tok/s (512-token chunks)", "unit": "tok/s", "optimized": 40_000.0, "baseline": 1.0}
    (work / "speed.json").write_text(json.dumps({"machine": {"gpu": "H200"}, "figures": [inject]}))
    (work / "matmul.json").write_text(json.dumps({"tflops": 800.0}))
    (work / "parity.json").write_text(json.dumps({"ok": True}))
    document = run(gpu_check, tmp_path, "report", "--work", work, "--shape", "8b")
    per_token = 2 * 6_979_321_856  # Llama-3-8B's decoder linear weights
    assert document["inject"]["flop_per_token"] == per_token
    assert document["inject"]["fraction_of_peak"] == pytest.approx(40_000 * per_token / 800e12)
    assert document["inject"]["meets_goal"] is True  # 0.70 >= 0.5
    assert document["ok"] and document["machine"] == {"gpu": "H200"}
    assert "error" in document["memory"] and "error" in document["retention"]  # steps that did not run
