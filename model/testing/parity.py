"""Replay a reference-output directory (the format of shared/fixtures/official) and compare every tensor.

Usage: python -m model.testing.parity DIR [DIR ...]   exit 0 only when every comparison is within tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import load
from ..core.generate import DecodeSettings, generate
from ..core.memoryllm import MemoryLLM
from ..core.mplus import MPlus, Retrieval
from ..memory.state import MemoryState, new_generator
from ..policies.authors import tiled_indices

# README §5 of the fixtures: what is compared exactly and with which absolute tolerance
REQUIRED_FILES = ("meta.json", "tensors.safetensors", "model/config.json")
TOLERANCES = {"logits": 1e-4, "hidden_states": 1e-4, "memory": 1e-4, "rows": 1e-4, "scores": 1e-5, "rope": 1e-5}


@dataclass
class Report:
    rows: list[tuple[str, float, float | None, bool]] = field(default_factory=list)
    compared: set[str] = field(default_factory=set)

    def close(self, key: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        self.compared.add(key)
        ours = ours.detach().float().cpu().reshape(ref.shape) if ours.numel() == ref.numel() else ours
        if tuple(ours.shape) != tuple(ref.shape):
            self.rows.append((f"{key} shape {tuple(ours.shape)} != {tuple(ref.shape)}", float("inf"), tol, False))
            return
        diff = (ours - ref.float()).abs().max().item() if ref.numel() else 0.0
        self.rows.append((key, diff, tol, diff <= tol))

    def exact(self, key: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        self.compared.add(key)
        ours = ours.detach().cpu()
        same = tuple(ours.shape) == tuple(ref.shape) and torch.equal(ours.to(ref.dtype), ref)
        if same:
            mismatches = 0.0
        elif ours.numel() == ref.numel():
            mismatches = float((ours.reshape(-1) != ref.reshape(-1).to(ours.dtype)).sum())
        else:
            mismatches = float("inf")
        self.rows.append((key, mismatches, None, same))

    @property
    def ok(self) -> bool:
        return all(row[3] for row in self.rows)

    def print(self, title: str) -> None:
        print(f"== {title}")
        width = max(len(r[0]) for r in self.rows)
        for key, diff, tol, ok in self.rows:
            bound = "exact" if tol is None else f"<= {tol:.0e}"
            measure = f"{int(diff)} mismatches" if tol is None else f"max |diff| {diff:.3e}"
            print(f"  {'ok  ' if ok else 'FAIL'} {key:<{width}}  {measure:<22} {bound}")


def recording(model: MemoryLLM) -> AbstractContextManager[list[tuple[int, Retrieval]]]:
    """Context manager yielding the list of (layer, Retrieval) made inside it (always empty for MemoryLLM)."""
    return model.recording_retrievals() if isinstance(model, MPlus) else nullcontext([])


def same_state(a: MemoryState, b: MemoryState) -> bool:
    ours, theirs = a.to_tensors(), b.to_tensors()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def compare_forward(report: Report, prefix: str, model: MemoryLLM, state, question, ref: dict) -> None:
    cache_pending = state.ltm is not None and state.ltm.cache_size > 0
    with recording(model) as retrievals:
        out = model(question[None], state, return_hidden=True)
    report.close(f"{prefix}.logits", out.logits[0], ref[f"{prefix}.logits"], TOLERANCES["logits"])
    if f"{prefix}.hidden_states" in ref:
        hidden = torch.stack([h[0] for h in out.hidden_states])  # [L+1, q, d]
        report.close(f"{prefix}.hidden_states", hidden, ref[f"{prefix}.hidden_states"], TOLERANCES["hidden_states"])
    if f"{prefix}.retrieved_ltm.0" in ref:
        compare_retrievals(report, prefix, retrievals, cache_pending, ref)


# -- M+ ------------------------------------------------------------------------------------------
def authors_ltm_indices(retrieval: Retrieval, cache_pending: bool) -> torch.Tensor:
    """The authors' bookkeeping `ltm_indices`: the chosen candidates in placement order; with a pending
    cache only the LTM candidates in the order they were chosen: ascending after the top-k, the tile
    order on the tiled path (fewer LTM rows than T, no scores)."""
    if not cache_pending:
        return retrieval.indices
    if retrieval.scores is None:
        return tiled_indices(retrieval.num_ltm, retrieval.indices.numel())
    return retrieval.indices[retrieval.indices < retrieval.num_ltm].sort().values


def compare_retrievals(report: Report, prefix: str, retrievals: list, cache_pending: bool, ref: dict) -> None:
    """Scores, placed rows and indices of every layer's retrieval; no reference scores = the tiled path."""
    for layer, r in retrievals:
        scores = f"{prefix}.retrieval_scores.{layer}"
        if scores in ref:
            ours = r.scores if r.scores is not None else torch.empty(0)
            report.close(scores, ours, ref[scores], TOLERANCES["scores"])
        else:
            report.exact(f"{scores} absent: tiled path", torch.tensor(r.scores is None), torch.tensor(True))
        rows = f"{prefix}.retrieved_ltm.{layer}"
        report.close(rows, r.rows, ref[rows], TOLERANCES["rows"])
        indices = f"{prefix}.retrieved_ltm_indices.{layer}"
        report.exact(indices, authors_ltm_indices(r, cache_pending), ref[indices])


def compare_ltm(report: Report, prefix: str, state: MemoryState, ref: dict) -> None:
    """LTM rows, keys, recall frequencies and ages, STM ages, and the dropped-row cache (which must be
    empty where the reference has none)."""
    ltm = state.ltm
    for layer, part in enumerate(ltm.layers):
        report.close(f"{prefix}.ltm.{layer}", part.rows, ref[f"{prefix}.ltm.{layer}"], TOLERANCES["rows"])
        report.close(f"{prefix}.ltm_keys.{layer}", part.keys, ref[f"{prefix}.ltm_keys.{layer}"], TOLERANCES["rows"])
        rf = f"{prefix}.ltm_recall_frequencies.{layer}"
        report.exact(rf, part.recall_frequencies, ref[rf])
        report.exact(f"{prefix}.ltm_ages.{layer}", part.ages, ref[f"{prefix}.ltm_ages.{layer}"])
        report.exact(f"{prefix}.memory_ages.{layer}", state.memory_ages[layer], ref[f"{prefix}.memory_ages.{layer}"])
    if f"{prefix}.cached_dropped_memories" in ref:
        cache = f"{prefix}.cached_dropped"
        report.close(f"{cache}_memories", ltm.cached_rows, ref[f"{cache}_memories"], TOLERANCES["rows"])
        report.close(f"{cache}_keys", ltm.cached_keys, ref[f"{cache}_keys"], TOLERANCES["rows"])
        report.exact(f"{cache}_memory_ages", ltm.cached_ages, ref[f"{cache}_memory_ages"])
    else:
        report.exact(f"{prefix}.cached_dropped_* absent: cache empty", torch.tensor(ltm.cache_size), torch.tensor(0))


def compare_ltm_summary(report: Report, i: int, state: MemoryState, summary: dict) -> None:
    """LTM sizes per layer, cached rows and update_step against meta.injections[i]."""
    ltm = state.ltm
    ours = torch.tensor([*ltm.sizes(), ltm.cache_size, ltm.update_step])
    ref = [*summary["ltm_sizes_after"], summary["cached_dropped_rows_after"], summary["update_step_after"]]
    report.exact(f"inj{i} ltm sizes, cached rows, update_step (meta)", ours, torch.tensor(ref))


def replay(directory: Path) -> Report:
    meta = json.loads((directory / "meta.json").read_text())
    ref = load_file(directory / "tensors.safetensors")
    report = Report()
    torch.set_num_threads(1)
    inv_dtype = meta.get("rope", {}).get("inv_freq_dtype", "float32")
    model = load(directory / "model", dtype=torch.float32, tokenizer=False, rope_inv_freq_dtype=inv_dtype)
    mplus = isinstance(model, MPlus)

    # rope tables
    report.close("rope.inv_freq", model.inv_freq, ref["rope.inv_freq"], TOLERANCES["rope"])
    # the same model with unrounded inverse frequencies, for the scenarios that record it
    fp32 = None
    if "rope.inv_freq_fp32" in ref or "fwd_final_inv_freq_fp32.logits" in ref:
        fp32 = load(directory / "model", dtype=torch.float32, tokenizer=False, rope_inv_freq_dtype="float32")
    if "rope.inv_freq_fp32" in ref:
        report.close("rope.inv_freq_fp32", fp32.inv_freq, ref["rope.inv_freq_fp32"], TOLERANCES["rope"])
    cos, sin = model.cos_sin(torch.arange(ref["rope.cos"].shape[0]))
    report.close("rope.cos", cos, ref["rope.cos"], TOLERANCES["rope"])
    report.close("rope.sin", sin, ref["rope.sin"], TOLERANCES["rope"])

    state = model.new_state()
    report.close("init.memory", state.memory, ref["init.memory"], TOLERANCES["memory"])
    if mplus:
        compare_ltm(report, "init", state, ref)
    question = ref["input.question"]
    before = state.clone()
    compare_forward(report, "fwd_init", model, state, question, ref)

    for i, seed in enumerate(meta["inject_seeds"]):
        state.generator = new_generator(seed)
        if f"inj{i}.rng_state" in ref:
            report.exact(f"inj{i}.rng_state", state.generator.get_state(), ref[f"inj{i}.rng_state"])
        result = model.inject(state, ref[f"input.context.{i}"])
        report.exact(f"inj{i}.randperm", result.perms, ref[f"inj{i}.randperm"])
        report.close(f"inj{i}.delta_memory", result.delta, ref[f"inj{i}.delta_memory"], TOLERANCES["memory"])
        report.close(f"inj{i}.memory", state.memory, ref[f"inj{i}.memory"], TOLERANCES["memory"])
        if mplus:
            compare_ltm(report, f"inj{i}", state, ref)
            compare_ltm_summary(report, i, state, meta["injections"][i])
        before = state.clone()
        compare_forward(report, f"fwd_after_inj{i}", model, state, question, ref)

    if "fwd_final_inv_freq_fp32.logits" in ref:
        compare_forward(report, "fwd_final_inv_freq_fp32", fp32, state, question, ref)

    settings = DecodeSettings(max_new_tokens=int(meta["generate"]["max_new_tokens"]))
    with recording(model) as retrievals:
        gen = generate(model, state, question, settings, keep_logits=True)
    report.exact("generate.ids", torch.tensor(gen.token_ids), ref["generate.ids"])
    report.close("generate.logits", torch.stack(gen.step_logits), ref["generate.logits"], TOLERANCES["logits"])
    if mplus:
        expected = int(meta["generate"]["prefill_retrievals"])
        report.exact("generate retrievals (prefill only)", torch.tensor(len(retrievals)), torch.tensor(expected))
        for layer, r in retrievals:
            key = f"generate.retrieved_ltm.{layer}"
            report.close(key, r.rows, ref[key], TOLERANCES["rows"])
    unchanged = torch.tensor(same_state(before, state))
    report.exact("memory unchanged by forward and generate", unchanged, torch.tensor(True))

    for key in sorted(set(ref) - report.compared):
        if not key.startswith("input."):
            report.rows.append((f"{key} (not compared)", float("inf"), 0.0, False))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.testing.parity", description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path, help="reference-output directories")
    args = parser.parse_args(argv)
    for directory in args.directories:
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            print(f"parity: {directory} is not a reference-output directory (no {', '.join(missing)})", file=sys.stderr)
            return 2
    all_ok = True
    for directory in args.directories:
        report = replay(directory)
        report.print(f"{directory} ({'PASS' if report.ok else 'FAIL'})")
        all_ok &= report.ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
