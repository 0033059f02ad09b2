"""The measurements of scripts/gpu-check.sh, one subcommand each, every one writing a JSON part; `report` joins
the parts, `mplus bench speed`'s JSON and the retention run into one document.

  parity DIR...  replay the parity fixtures on --device: float32 within model.testing.parity's own tolerances, bfloat16
                 within BF16_TOL of each tensor's scale
  matmul         the bf16 matmul peak: --size^3 matmuls timed with CUDA events
  memory         peak GPU memory of one inject and one question on the random models of --shape, beside the
                 paper's figures
  retrieval      M+ retrieval per layer with the keys scored on --device (their bf16 mirror) vs on the CPU, for
                 random LTMs of the shape's layout at --ltm-sizes rows per layer
  report         gpu-check.json: the parts, the inject throughput as a fraction of the matmul peak, the verdict

On a CPU every part runs too (small sizes, no GPU memory figures): the tests run it so.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

import model as mp  # noqa: E402
from model.memory.dtypes import dtype_name  # noqa: E402
from model.testing import parity as par  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "official"
BF16_TOL = 0.15  # bf16: max|diff| <= BF16_TOL * max(1, max|ref|) per tensor (worst seen on the CPU: 0.10)
DISCRETE = ("retrieved_ltm", "generate.")  # after a top-k or greedy choice that bf16 may flip: shown, not judged
DROPS = ("randperm", "rng_state")  # the drop generator: exact in every dtype
PAPER_MB = {"memoryllm": 21_176.24, "mplus": 21_177.76}  # M+ paper: GPU memory of the 8B models (MB, read as MiB)
INJECT_GOAL = 0.5  # inject FLOP/s over the measured bf16 matmul peak


# -- parity ------------------------------------------------------------------------------------------------
@dataclass
class ScaledReport(par.Report):
    """model.testing.parity's report, also keeping each compared tensor's scale max|ref| (for the bf16 tolerance)."""

    scales: dict[str, float] = field(default_factory=dict)

    def close(self, key: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        self.scales[key] = float(ref.float().abs().max()) if ref.numel() else 0.0
        super().close(key, ours, ref, tol)


@contextmanager
def replaying_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """parity.replay with each fixture model loaded on `device` in `dtype` (it loads float32 on the CPU)."""
    load, report = par.load, par.Report
    par.load = lambda *args, **kwargs: load(*args, **(kwargs | {"dtype": dtype, "device": device}))
    par.Report = ScaledReport
    try:
        yield
    finally:
        par.load, par.Report = load, report


def judge(report: ScaledReport, dtype: torch.dtype) -> dict[str, Any]:
    """float32: every comparison within model.testing.parity's tolerance. bfloat16: each tensor within BF16_TOL of its
    scale and the drop generator exact; what follows a top-k or greedy choice that bf16 flipped is listed apart.
    `worst`: the largest error of a tensor, in units of its tolerance."""
    judged, flipped = [], []  # judged: (key, error in units of the tolerance or None if exact, ok)
    for key, diff, tol, ok in report.rows:
        if dtype == torch.float32:
            judged.append((key, None if tol is None else diff / tol, ok))
            continue
        error = None if tol is None else diff / max(1.0, report.scales.get(key, 0.0)) / BF16_TOL
        within = ok if error is None else error <= 1
        if any(d in key for d in DISCRETE) or (tol is None and not any(d in key for d in DROPS)):
            flipped += [] if within else [key]
        else:
            judged.append((key, error, within))
    failed = [key for key, _, ok in judged if not ok]
    worst = max((row for row in judged if row[1] is not None), key=lambda row: row[1], default=("", 0.0, True))
    return {
        "ok": not failed,
        "compared": len(judged),
        "failed": failed[:10],
        "worst": {"key": worst[0], "error_over_tolerance": round(worst[1], 4)},
        "after_a_flipped_choice": flipped[:10],
    }


def parity(directories: list[Path], device: torch.device) -> dict[str, Any]:
    """Every fixture replayed in float32 and bfloat16 on `device`."""
    out: dict[str, Any] = {"bf16_tolerance": f"max|diff| <= {BF16_TOL} * max(1, max|ref|) per tensor"}
    for dtype in (torch.float32, torch.bfloat16):
        name, results = dtype_name(dtype), {}
        with replaying_on(device, dtype):
            for directory in directories:
                try:
                    results[directory.name] = judge(par.replay(directory), dtype)
                except Exception as e:  # a crash on this device is a finding too
                    results[directory.name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out[name] = results | {"ok": all(r["ok"] for r in results.values())}
    out["ok"] = out["float32"]["ok"] and out["bfloat16"]["ok"]
    return out


# -- matmul peak -------------------------------------------------------------------------------------------
def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Mean seconds of fn() after `warmup` calls: CUDA events on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000 / repeats


def matmul_peak(device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    """bf16 [size, size] @ [size, size]: 2 size^3 FLOP per call."""
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    c = torch.empty_like(a)
    seconds = seconds_per_call(lambda: torch.matmul(a, b, out=c), device, repeats)
    return {"size": size, "repeats": repeats, "seconds": seconds, "tflops": 2 * size**3 / seconds / 1e12}


# -- peak memory -------------------------------------------------------------------------------------------
def peak_memory(shape_name: str, device: torch.device, ltm_rows: int) -> dict[str, Any]:
    """Per random model of the shape in bf16 (M+ with an LTM of `ltm_rows` rows per layer): the peak GPU memory
    (MiB, torch.cuda.max_memory_allocated) of building it, two injects of the shape's chunk and one question,
    beside the paper's; and the second inject's tokens/s (model.inject: encoding and the memory update)."""
    from tasks import speed as sp

    shape, out = sp.SHAPES[shape_name], {}
    for flavour, config in (("memoryllm", shape.memoryllm), ("mplus", shape.mplus)):
        paper = PAPER_MB[flavour]
        try:
            peak, tokens_per_s = measure_peak(config, shape, device, ltm_rows)
            ratio = None if peak is None else round(peak / paper, 3)
            out[flavour] = {"peak_mib": peak, "paper_mb": paper, "over_paper": ratio, "inject_tok_s": tokens_per_s}
        except Exception as e:
            out[flavour] = {"error": f"{type(e).__name__}: {e}", "paper_mb": paper}
    return out | {"shape": shape_name, "dtype": "bfloat16", "ltm_rows": ltm_rows}


def measure_peak(config: dict[str, Any], shape, device: torch.device, ltm_rows: int) -> tuple[float | None, float]:
    from tasks.random_models import random_ids, random_ltm, random_model_with_memory, with_ltm

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = random_model_with_memory(config, device, torch.bfloat16)
        vocab = model.cfg.vocab_size
        ltm = random_ltm(model, ltm_rows, 0, Path(tmp)) if model.cfg.kind == "mplus" else None
        state = with_ltm(model, ltm) if ltm is not None else model.new_state(0)
        chunk = random_ids(shape.inject_tokens, vocab)
        model.inject(state, chunk)  # warm-up
        seconds = seconds_per_call(lambda: model.inject(state, chunk), device, repeats=1, warmup=0)
        question = random_ids(shape.prompt_tokens, vocab, seed=1).tolist()
        mp.generate(model, state, question, mp.DecodeSettings(max_new_tokens=shape.new_tokens))
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return None if peak is None else round(peak, 2), len(chunk) / seconds


# -- M+ retrieval: device vs CPU ----------------------------------------------------------------------------
def retrieval_speed(shape_name: str, device: torch.device, sizes: list[int], repeats: int) -> dict[str, Any]:
    """Seconds per layer of one question's M+ retrieval (bf16 model) with the keys scored on `device` (the bank's
    key mirror there, built once and timed apart) vs on the CPU, at each LTM size (rows per layer, plus half a
    merge cycle of cached rows), and whether both picked the same rows. The random model has the shape's layers,
    hidden and selector sizes but a small MLP and vocabulary, which retrieval never reads."""
    from tasks import speed as sp
    from tasks.random_models import first_rows, random_ltm, random_model_with_memory

    shape = sp.SHAPES[shape_name]
    small = {"intermediate_size": 256, "vocab_size": 256}
    model = random_model_with_memory(shape.mplus | small, device, torch.bfloat16)
    cfg = model.cfg
    cached = cfg.num_tokens * (cfg.update_ltm_frequency // 2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape.prompt_tokens, cfg.hidden_size, generator=g).to(device, model.dtype)  # [n_q, d]
    out: dict[str, Any] = {"shape": shape_name, "device": str(device), "prompt_tokens": shape.prompt_tokens}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ltm = random_ltm(model, max(sizes), cached, Path(tmp))
        dtype = model.retrieval.device_key_dtype(model)
        build = seconds_per_call(lambda: ltm.bank.device_keys(model.device, dtype), device, repeats=1, warmup=0)
        mib = len(ltm.bank) * cfg.selector_hidden_dim * dtype.itemsize / 2**20
        out["mirror"] = {"entries": len(ltm.bank), "dtype": dtype_name(dtype), "mib": round(mib, 1), "build_s": build}
        out["sizes"] = []
        for n in sizes:
            state = replace(model.initial_state, ltm=first_rows(ltm, n, cache=True))  # the same bank and mirror
            (on, device_s), (off, cpu_s) = (timed_retrievals(model, state, h, d, repeats) for d in (True, False))
            pairs = list(zip(on, off, strict=True))
            same = sum(torch.equal(a.indices, b.indices) for a, b in pairs)
            out["sizes"].append(
                {
                    "ltm_rows": n,
                    "cached_rows": cached,
                    "device_s_per_layer": device_s,
                    "cpu_s_per_layer": cpu_s,
                    "speedup": cpu_s / device_s,
                    "layers_with_the_same_rows": f"{same}/{cfg.num_layers}",
                    "max_score_diff": max(float((a.scores - b.scores).abs().max()) for a, b in pairs),
                }
            )
    return out


def timed_retrievals(model, state, h: torch.Tensor, on_device: bool, repeats: int) -> tuple[list, float]:
    """Every layer's Retrieval for the question states h, scored on the model's device or on the CPU, and the
    seconds per layer that takes."""
    model.retrieval.device_scoring = on_device
    layers = range(model.cfg.num_layers)
    try:
        retrievals = [model.retrieve(layer, state, h) for layer in layers]  # also the warm-up
        seconds = seconds_per_call(
            lambda: [model.retrieve(layer, state, h) for layer in layers], model.device, repeats, 0
        )
    finally:
        model.retrieval.device_scoring = None
    return retrievals, seconds / len(layers)


# -- report ------------------------------------------------------------------------------------------------
def decoder_flop_per_token(config: dict[str, Any]) -> float:
    """2 x the weights of the decoder layers' linear maps (attention q, k, v, o and the MLP): the matmul FLOP
    per injected token. Embeddings and the LM head are left out (an inject reads no logits); attention over the
    memory and LoRA add a few percent that are not counted."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    attention = d * (heads + 2 * kv) * head_dim + heads * head_dim * d
    return 2.0 * layers * (attention + 3 * d * inter)


def inject_fraction(speed: dict[str, Any], memory: dict[str, Any], matmul: dict[str, Any], shape_name: str):
    """The MemoryLLM model's inject tokens/s as FLOP/s, over the matmul peak: bench speed's figure, else (bench
    speed did not finish) the memory step's."""
    from tasks import speed as sp

    figures = [f["optimized"] for f in speed.get("figures", []) if f["name"].startswith("inject tok/s")]
    fallback = memory.get("memoryllm", {}).get("inject_tok_s")
    if not (figures or fallback) or "tflops" not in matmul:
        return {"error": "no inject figure or no matmul peak (see the steps)"}
    source = "bench speed (model.inject, the smaller memory)" if figures else "the memory step (model.inject, one call)"
    tokens_per_s = figures[0] if figures else fallback
    per_token = decoder_flop_per_token(sp.SHAPES[shape_name].memoryllm)
    tflops = tokens_per_s * per_token / 1e12
    fraction = tflops / matmul["tflops"]
    return {
        "tokens_per_s": tokens_per_s,
        "source": source,
        "flop_per_token": per_token,
        "formula": "2 x decoder linear weights per token (q, k, v, o, gate, up, down; no embeddings, no LM head)",
        "tflops": tflops,
        "matmul_peak_tflops": matmul["tflops"],
        "fraction_of_peak": fraction,
        "goal": INJECT_GOAL,
        "meets_goal": fraction >= INJECT_GOAL,
    }


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{path.name}: {e}"}


def retention_part(directory: Path) -> dict[str, Any]:
    """The short retention sweep: its config's device and batch size, and its summary rows."""
    import pandas as pd

    if not (directory / "summary.csv").is_file():
        return {"error": f"no summary.csv in {directory}"}
    config = read_json(directory / "config.json")
    rows = pd.read_csv(directory / "summary.csv").to_dict("records")
    summary = [{k: r[k] for k in ("model", "control", "distance_tokens", "n", "exact_hit")} for r in rows]
    return {"device": config.get("device"), "batch_size": config.get("batch_size"), "summary": summary}


def report(work: Path, shape_name: str) -> dict[str, Any]:
    """gpu-check.json from the parts in `work`."""
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    speed, matmul = read_json(work / "speed.json"), read_json(work / "matmul.json")
    parity_part, memory = read_json(work / "parity.json"), read_json(work / "memory.json")
    retrieval = read_json(work / "retrieval.json")
    figures = [
        {k: f.get(k) for k in ("name", "unit", "optimized", "baseline", "passed")} for f in speed.get("figures", [])
    ]
    document = {
        "machine": speed.get("machine") or machine(),
        "steps": steps,
        "parity": parity_part,
        "matmul_bf16": matmul,
        "inject": inject_fraction(speed, memory, matmul, shape_name),
        "memory": memory,
        "retrieval": retrieval,
        "retention": retention_part(work / "retention"),
        "speed": {"figures": figures, "elapsed_s": speed.get("elapsed_s"), "error": speed.get("error")},
    }
    document["ok"] = all(s["rc"] == 0 for s in steps) and bool(parity_part.get("ok"))
    return document


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


# -- the command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("parity", "matmul", "memory", "retrieval", "report"))
    parser.add_argument("fixtures", nargs="*", type=Path, help="parity: fixture directories (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--size", type=int, default=8192, help="matmul: the square matrices' size")
    parser.add_argument("--repeats", type=int, default=50, help="matmul: timed calls")
    parser.add_argument("--shape", default="8b", help="memory, report: the random models' shape")
    parser.add_argument("--ltm-rows", type=int, default=10_000, help="memory: the M+ LTM rows per layer")
    parser.add_argument("--ltm-sizes", default="10000,40000", help="retrieval: LTM rows per layer, comma-separated")
    parser.add_argument("--work", type=Path, help="report: the directory of the parts")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.part == "parity":
        fixtures = args.fixtures or sorted(p for p in FIXTURES.iterdir() if (p / "meta.json").is_file())
        document = parity(fixtures, device)
    elif args.part == "matmul":
        document = matmul_peak(device, args.size, args.repeats)
    elif args.part == "memory":
        document = peak_memory(args.shape, device, args.ltm_rows)
    elif args.part == "retrieval":
        sizes = [int(n) for n in args.ltm_sizes.split(",")]
        document = retrieval_speed(args.shape, device, sizes, min(args.repeats, 3))
    else:
        document = report(args.work, args.shape)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
