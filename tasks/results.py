"""The output directory of a retention run: results.csv (crash-safe appends), summary.csv with 95%
confidence intervals, config.json, and the accuracy-vs-distance plot."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from model import store as st

from .sizes import format_size

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

COLUMNS = (
    "dataset",
    "sample_id",
    "model",
    "memory_kind",
    "control",
    "distance_tokens",
    "n_distractors",
    "question",
    "gold",
    "prediction",
    "exact_hit",
    "em",
    "f1",
    "latency_ms",
    "seed",
    "evidence_stm",
    "evidence_ltm",
    "evidence_retrieved",
    "evidence_read",
    "depth",
    "haystack_tokens",
)
SURVIVAL = ("evidence_stm", "evidence_ltm", "evidence_retrieved", "evidence_read")  # "" where they do not apply
TEXT_COLUMNS = ("dataset", "sample_id", "model", "memory_kind", "control", "question", "gold", "prediction")
SUMMARY_KEYS = ("dataset", "model", "memory_kind", "control", "distance_tokens")
NIAH_KEYS = ("dataset", "model", "memory_kind", "control", "haystack_tokens", "depth")  # a cell of the heatmap
RUN_KEYS = ("dataset", "protocol", "model", "memory_kind", "control", "distance_tokens")  # across runs
Metric = Literal["exact_hit", "em", "f1"]
METRICS = get_args(Metric)
Z95 = 1.959964


class ResumeError(Exception):
    """The output directory holds results that this run cannot continue."""


def write_atomic(path: Path, data: bytes) -> None:
    """The store's atomic write with the permissions the umask gives (results are meant to be shared)."""
    st.write_atomic(path, data, mode=0o666)


def csv_text(rows: Sequence[Mapping[str, Any]], header: bool = False, columns: Sequence[str] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(columns)
    writer.writerows([[row[c] for c in columns] for row in rows])
    return buffer.getvalue()


class ResultsLog:
    """results.csv (a retention run's `columns` unless told otherwise). Each append is one write, flushed and
    fsynced. Opening drops a torn last record (a crash mid-write): a record counts only if it has every column
    and ends with a newline."""

    def __init__(self, path: Path, columns: Sequence[str] = COLUMNS):
        self.path, self.columns = path, tuple(columns)
        self.rows: list[dict[str, str]] = []
        if not path.exists():
            write_atomic(path, csv_text([], header=True, columns=self.columns).encode())
            return
        with open(path, newline="", encoding="utf-8", errors="replace") as f:  # a torn record may end mid-character
            text = f.read()
        records = list(csv.reader(io.StringIO(text, newline="")))
        if not records or tuple(records[0]) != self.columns:
            raise ResumeError(f"{path} does not have the columns of this command's results file")
        body = records[1:-1] if not text.endswith("\n") else records[1:]
        self.rows = [dict(zip(self.columns, r, strict=True)) for r in body if len(r) == len(self.columns)]
        if len(self.rows) != len(records) - 1:
            self.rewrite(self.rows)

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            f.write(csv_text(rows, columns=self.columns))
            f.flush()
            os.fsync(f.fileno())
        self.rows += [{c: str(row[c]) for c in self.columns} for row in rows]

    def rewrite(self, rows: list[dict[str, str]]) -> None:
        write_atomic(self.path, csv_text(rows, header=True, columns=self.columns).encode())
        self.rows = rows

    def whole_units(
        self, unit: Callable[[dict[str, str]], Hashable | None], expected: Callable[[Hashable], int | None]
    ) -> set[Hashable]:
        """The units (`unit(row)`; None: a row of no unit counted here) that have all `expected(unit)` rows; the
        rows of the others (a crash between two writes) are dropped from the file. A unit whose expected count
        is None is kept as it is."""
        counts = Counter(u for row in self.rows if (u := unit(row)) is not None)
        broken = {u for u, n in counts.items() if (want := expected(u)) is not None and n != want}
        if broken:
            self.rewrite([row for row in self.rows if unit(row) not in broken])
        return set(counts) - broken

    def complete_units(self, model: str, expected: Mapping[str, int], seed: int) -> set[tuple[str, str]]:
        """(sample id, control) of the units of `model` under `seed` that have all `expected[control]` rows
        (`whole_units`). Units of a control this run does not expect (a resume without an earlier --controls
        or --system) are kept."""

        def unit(row: dict[str, str]) -> tuple[str, str] | None:
            return (row["sample_id"], row["control"]) if row["model"] == model and row["seed"] == str(seed) else None

        return self.whole_units(unit, lambda u: expected.get(u[1]))


def write_run(
    directory: Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    summary: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
) -> None:
    """A run computed whole: results.csv (`rows` in `columns`), summary.csv (its rows' own keys) and config.json."""
    write_atomic(directory / "results.csv", csv_text(rows, header=True, columns=columns).encode())
    write_atomic(directory / "summary.csv", csv_text(summary, header=True, columns=list(summary[0])).encode())
    write_config(directory / "config.json", config)


def holds_results(path: Path) -> bool:
    """Whether results.csv at `path` has a line past its header (a run that failed before its first
    result leaves only the header, and can simply be run again)."""
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return len(list(itertools.islice(f, 2))) > 1


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and records of a finished results.csv (any benchmark's), as the strings written (to copy
    them unchanged)."""
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    if not records or "model" not in records[0]:
        raise ResumeError(f"{path} does not have the columns of a benchmark's results file")
    return records[0], [dict(zip(records[0], r, strict=True)) for r in records[1:]]


def read_results(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False)


def load_runs(directories: Sequence[Path]) -> pd.DataFrame:
    """The rows of several runs, each tagged with its protocol from config.json; a sample measured by two
    runs (same model, control, distance and seed) counts once, so does a directory given twice. Shards of
    one run pool into one series when summarized by RUN_KEYS."""
    import pandas as pd

    frames = []
    for directory in dict.fromkeys(Path(d).resolve() for d in directories):
        config = directory / "config.json"
        protocol = json.loads(config.read_text()).get("protocol", "") if config.exists() else ""
        frames.append(read_results(directory / "results.csv").assign(protocol=protocol))
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates([*RUN_KEYS, "sample_id", "seed"], ignore_index=True)


def model_details(directories: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """{model: its details} from the runs' config.json (a later run's entry replaces an earlier one's)."""
    details = {}
    for directory in directories:
        config = Path(directory) / "config.json"
        if config.exists():
            details |= json.loads(config.read_text()).get("model_details", {})
    return details


def model_labels(directories: Sequence[Path]) -> dict[str, str]:
    """Each model's label (e.g. "training-free memory, demo") from the runs' config.json."""
    return {name: entry.get("label", "") for name, entry in model_details(directories).items()}


def drop_rates(directories: Sequence[Path]) -> dict[str, tuple]:
    """{model: (K/N, tokens per injection, tokens before the first drop)} of the MemoryLLM models in the runs'
    config.json (see figure)."""
    return details_drop_rates(model_details(directories))


def details_drop_rates(details: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple]:
    """drop_rates from one config's model_details."""
    return {name: tuple(e["drop_rate"]) for name, e in details.items() if "drop_rate" in e}


# -- summary --------------------------------------------------------------------------------------
def wilson(hits: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate hits/n."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if hits == 0 else center - half), (1.0 if hits == n else center + half)


def mean_interval(values: pd.Series, z: float = Z95) -> tuple[float, float]:
    """mean ± z·SE (NaN for fewer than two values)."""
    if len(values) < 2:
        return math.nan, math.nan
    half = z * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def summarize(results: pd.DataFrame, keys: Sequence[str] = SUMMARY_KEYS) -> pd.DataFrame:
    """Per key group: n, each metric's mean and 95% interval (Wilson for exact_hit and em, mean ± 1.96 SE
    for f1), and the mean evidence survival (empty where it does not apply)."""
    import pandas as pd

    rows = []
    for key, group in results.groupby(list(keys), sort=False):
        row = dict(zip(keys, key, strict=True)) | {"n_distractors": int(group.n_distractors.max()), "n": len(group)}
        for metric in METRICS:
            values = group[metric].astype(float)
            lo, hi = mean_interval(values) if metric == "f1" else wilson(values.sum(), len(values))
            row |= {metric: values.mean(), f"{metric}_lo": lo, f"{metric}_hi": hi}
        for column in SURVIVAL:
            row[column] = pd.to_numeric(group[column], errors="coerce").mean() if column in group else float("nan")
        rows.append(row | seed_spread(group))
    columns = [*keys, "n_distractors", "n", *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")), *SURVIVAL]
    columns += ["n_seeds", *(f"{m}_seed_sd" for m in METRICS)]
    return pd.DataFrame(rows, columns=columns).sort_values(list(keys), kind="stable", ignore_index=True)


def seed_spread(group: pd.DataFrame) -> dict[str, float | int]:
    """The seeds a group's answers ran under, and each metric's standard deviation over the per-seed means
    (NaN for one seed): how much the drop seed moves the figure, beside the interval over the answers."""
    seeds = group.seed if "seed" in group else [0] * len(group)  # results without the column: one seed
    per_seed = group.groupby(seeds)[list(METRICS)].apply(lambda rows: rows.astype(float).mean())  # [seeds, metrics]
    spread = per_seed.std(ddof=1) if len(per_seed) > 1 else dict.fromkeys(METRICS, math.nan)
    return {"n_seeds": len(per_seed)} | {f"{m}_seed_sd": float(spread[m]) for m in METRICS}


def write_summary(results: pd.DataFrame, path: Path, keys: Sequence[str] = SUMMARY_KEYS) -> pd.DataFrame:
    summary = summarize(results, keys)
    write_atomic(path, summary.to_csv(index=False, float_format="%.6g").encode())
    return summary


def finish(directory: Path, config: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's results.csv summarized into summary.csv and retention.png (niah: per haystack length and
    depth, and niah.png), and `config` written as its config.json; returns (results, summary)."""
    results = read_results(directory / "results.csv")
    if config["dataset"] == "niah":
        summary = write_summary(results, directory / "summary.csv", NIAH_KEYS)
        heatmap(summary, directory / "niah.png")
        write_config(directory / "config.json", config)
        return results, summary
    summary = write_summary(results, directory / "summary.csv")
    details = config["model_details"]
    labels = {name: entry.get("label", "") for name, entry in details.items()}
    title = f"{config['dataset']}, {config['protocol']} protocol"
    plot(summary, directory / "retention.png", title=title, labels=labels, drop_rates=details_drop_rates(details))
    write_config(directory / "config.json", config)
    return results, summary


# -- config ---------------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(config, indent=1) + "\n").encode())


def check_resumable(path: Path, config: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse to continue a run whose recorded `keys` differ from this one's."""
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    changed = [k for k in keys if recorded.get(k) != config.get(k)]
    if changed:
        details = "; ".join(f"{k}: {recorded.get(k)!r} then, {config.get(k)!r} now" for k in changed)
        raise ResumeError(f"{path.parent} holds a run with other settings ({details})")


# -- plot -----------------------------------------------------------------------------------------
def figure(
    summary: pd.DataFrame,
    metric: str = "exact_hit",
    title: str = "",
    labels: Mapping[str, str] | None = None,
    drop_rates: Mapping[str, tuple] | None = None,
) -> Figure:
    """Accuracy vs distance with 95% bands: one line per model/control (plus dataset/protocol when several),
    named with the model's label from `labels` (e.g. "training-free memory, demo"), the control and n;
    closed-book is a dashed level across the whole range. Under it, when the results have them, the
    evidence's survival: its rows in the short-term memory, in the long-term memory and among the rows a
    question retrieved, beside the theory for random drops, (1 - K/N)^s after s injections, for the models
    in `drop_rates` ({model: (K/N, tokens per injection)}). The distance axis is symlog, linear up to the
    first point, with a tick at every point."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    survived = summary[summary.control == "memory"] if "evidence_stm" in summary and len(summary) else summary[:0]
    survived = survived[survived.evidence_stm.notna()] if len(survived) else survived
    fig = Figure(figsize=(8, 8 if len(survived) else 5), layout="constrained")
    ax, below = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2]) if len(survived) else (fig.subplots(), None)
    keys = [k for k in ("dataset", "protocol", "model", "control") if k in summary]
    tagged = [k for k in ("dataset", "protocol") if k in summary and summary[k].nunique() > 1]
    points = sorted(int(d) for d in summary.distance_tokens.unique()) if len(summary) else [0]
    right = max(points[-1], 1)
    colors: dict[str, str] = {}  # each model's colour in the accuracy panel, reused in the survival panel
    for key, group in summary.groupby(keys, sort=False):
        series = dict(zip(keys, key, strict=True))
        flavour = (labels or {}).get(series["model"])
        n = sorted({int(group.n.min()), int(group.n.max())})
        label = series["model"] + (f" ({flavour})" if flavour else "") + f", {series['control']}"
        label += "".join(f" [{series[k]}]" for k in tagged) + ", n=" + "-".join(map(str, n))
        x, y = group.distance_tokens.to_numpy(), group[metric].to_numpy()
        lo, hi = group[f"{metric}_lo"].to_numpy(), group[f"{metric}_hi"].to_numpy()
        if series["control"] == "closed-book":
            (line,) = ax.plot([0, right], [y[0], y[0]], linestyle="--", label=label)
            ax.fill_between([0, right], [lo[0]] * 2, [hi[0]] * 2, color=line.get_color(), alpha=0.15)
        else:
            system = series["control"] not in ("memory", "full-context")  # a memory system: its own style
            (line,) = ax.plot(x, y, marker="s" if system else "o", linestyle=":" if system else "-", label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            colors.setdefault(series["model"], line.get_color())
    ax.set_xscale("symlog", linthresh=min([p for p in points if p > 0] or [1]), linscale=0.5)
    ax.xaxis.set_major_locator(FixedLocator(points))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_size(int(round(value)))))
    for axis in [ax] if below is None else [ax, below]:  # the last two points may be close (128k, 160k)
        axis.tick_params(axis="x", labelsize="small", labelrotation=45)
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1)
    ax.set_xlabel("tokens injected after the evidence (symlog scale)")
    ax.set_ylabel({"exact_hit": "exact hit", "em": "exact match", "f1": "F1"}[metric] + " (95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if below is not None:
        survival_panel(below, survived, drop_rates or {}, right, colors)
        ax.set_xlabel("")
    if len(summary):
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    return fig


def survival_panel(
    ax, survived: pd.DataFrame, drop_rates: Mapping[str, tuple], right: int, colors: Mapping[str, str]
) -> None:
    """Evidence survival vs distance in each model's colour: short-term (solid), long-term (dashed), retrieved
    (dotted), and the random-drop theory (thin): (1 - K/N)^s, s the injections after the first `free`
    tokens (a memory that starts empty drops nothing until it is full)."""
    import numpy as np

    styles = {
        "evidence_stm": ("-", "in short-term"),
        "evidence_ltm": ("--", "in long-term"),
        "evidence_retrieved": (":", "of retrieved rows"),
    }
    for model, group in survived.groupby("model", sort=False):
        color = colors.get(model)
        for column, (style, what) in styles.items():
            if group[column].notna().any():
                ax.plot(
                    group.distance_tokens,
                    group[column],
                    style,
                    color=color,
                    marker=".",
                    label=f"{model}: evidence {what}",
                )
        if model in drop_rates:
            rate, tokens, free = (*drop_rates[model], 0)[:3]
            x = np.linspace(0, right, 400)
            s = np.maximum(x - free, 0) / tokens
            ax.plot(x, (1 - rate) ** s, color=color, alpha=0.5, linewidth=1, label=f"{model}: (1 - K/N)^s")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the evidence's rows")
    ax.set_xlabel("tokens injected after the evidence (symlog scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper right")


def plot(
    summary: pd.DataFrame,
    path: Path,
    metric: str = "exact_hit",
    title: str = "",
    labels: Mapping[str, str] | None = None,
    drop_rates: Mapping[str, tuple] | None = None,
) -> None:
    """`figure` written to `path` as a PNG."""
    buffer = io.BytesIO()
    figure(summary, metric, title, labels, drop_rates).savefig(buffer, format="png", dpi=120)
    write_atomic(path, buffer.getvalue())


def heatmap(summary: pd.DataFrame, path: Path, metric: str = "exact_hit") -> None:
    """Needle in a haystack as the field draws it: per model and control, accuracy by needle depth (rows)
    and haystack length (columns), each cell written in, and the mean over depths per length under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.groupby(["model", "control"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.6), squeeze=False)
    for ax, ((model, control), group) in zip(axes[0], groups, strict=False):
        grid = group.pivot_table(index="depth", columns="haystack_tokens", values=metric, aggfunc="mean")
        grid = grid.sort_index().sort_index(axis=1)
        ax.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [format_size(int(n)) for n in grid.columns], rotation=45)
        ax.set_yticks(range(grid.shape[0]), [f"{int(d)}%" for d in grid.index])
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small")
        means = " ".join(f"{v:.2f}" for v in grid.mean(axis=0))
        ax.set_title(f"{model} · {control}\nmean over depths: {means}", fontsize="small")
        ax.set_xlabel("haystack tokens")
        ax.set_ylabel("needle depth")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
