"""The replayer against the authors' reference outputs: passes on them, fails when they are disturbed."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, MEMORYLLM_SCENARIOS
from safetensors.torch import load_file, save_file

from model.testing.parity import main, replay


@pytest.mark.parametrize("scenario", MEMORYLLM_SCENARIOS)
def test_memoryllm_scenarios_match_the_reference(scenario):
    report = replay(FIXTURES / scenario)
    failed = [row for row in report.rows if not row[3]]
    assert report.ok, failed
    compared = {row[0] for row in report.rows}
    assert {"generate.ids", "inj4.memory", "fwd_init.hidden_states"} <= compared


def disturbed_copy(tmp_path, scenario: str, key: str, delta: float):
    target = tmp_path / scenario
    shutil.copytree(FIXTURES / scenario, target)
    tensors = load_file(target / "tensors.safetensors")
    tensors[key] = tensors[key] + delta
    save_file(tensors, target / "tensors.safetensors")
    return target


def test_a_disturbance_beyond_tolerance_fails(tmp_path):
    target = disturbed_copy(tmp_path, "memoryllm", "fwd_after_inj2.logits", 1e-3)
    report = replay(target)
    assert [row[0] for row in report.rows if not row[3]] == ["fwd_after_inj2.logits"]
    assert main([str(target)]) == 1


def test_a_disturbance_within_tolerance_passes(tmp_path):
    assert main([str(disturbed_copy(tmp_path, "memoryllm", "inj1.memory", 2e-5))]) == 0


def test_unknown_reference_tensors_are_not_silently_ignored(tmp_path):
    target = disturbed_copy(tmp_path, "memoryllm", "generate.ids", 0)
    tensors = load_file(target / "tensors.safetensors")
    tensors["inj9.something_new"] = torch.zeros(3)
    save_file(tensors, target / "tensors.safetensors")
    report = replay(target)
    assert not report.ok and any("inj9.something_new" in row[0] for row in report.rows)


def test_command_line_replayer_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "model.testing.parity", str(FIXTURES / "memoryllm7b")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "generate.ids" in result.stdout


def test_a_directory_that_is_not_a_reference_output_is_a_usage_error(tmp_path, capsys):
    assert main([str(FIXTURES / "memoryllm"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta.json" in err and str(tmp_path) in err
