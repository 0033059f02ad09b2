"""What `mplus bench speed` reports: `Figure`s (an optimized path next to its baseline) in a `Report`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One measured pair. `compare` says what the ratio is and what `target` bounds:
    - "speedup": ratio = how many times better the optimized path is (baseline/optimized for seconds and
      bytes, optimized/baseline for tok/s); passes when ratio >= target;
    - "growth": ratio = optimized/baseline (the same code path under a larger load over a smaller one, or a
      cost over what it must at least cost); passes when ratio <= target;
    - "limit": ratio = optimized/baseline (shown only); passes when optimized <= target, in `unit`;
    - "increase": ratio = optimized/baseline; passes when optimized - baseline <= target, in `unit`."""

    name: str
    unit: str  # "s", "tok/s" or "B"
    optimized: float
    baseline: float
    compare: str = "speedup"
    target: float | None = None
    detail: str = ""  # what the two numbers are

    @property
    def ratio_of(self) -> str:
        return "baseline/optimized" if self.compare == "speedup" and self.unit != "tok/s" else "optimized/baseline"

    @property
    def ratio(self) -> float:
        if self.ratio_of == "optimized/baseline":
            return self.optimized / self.baseline
        return self.baseline / self.optimized

    @property
    def increase(self) -> float:
        return self.optimized - self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        measured = {"limit": self.optimized, "increase": self.increase}.get(self.compare, self.ratio)
        return measured >= self.target if self.compare == "speedup" else measured <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.compare == "limit":
            return f"<= {show(self.target, self.unit)}"
        if self.compare == "increase":
            return f"+ <= {show(self.target, self.unit)}"
        return f"{'>=' if self.compare == 'speedup' else '<='} {self.target:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "ratio": self.ratio,
            "ratio_of": self.ratio_of,
            "target": self.target_text() or None,
            "target_value": self.target,
            "passed": self.passed,
        }


def show(value: float, unit: str) -> str:
    """A value in its unit, scaled for reading."""
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 100 else f"{value:.1f} tok/s"
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    for scale, name in ((1, "s"), (1e-3, "ms")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {name}"
    return f"{value * 1e6:.0f} µs"


@dataclass
class Report:
    """The figures of one run, with the machine they were measured on and the run's setup."""

    machine: dict[str, Any]
    setup: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "setup": self.setup,
            "figures": [f.to_dict() for f in self.figures],
            "elapsed_s": self.elapsed_s,
        }
