"""Token counts written the way people say them: 512, 4k, 160k, 1M (k = 1,000 and M = 1,000,000)."""

from __future__ import annotations

import re
from decimal import Decimal

UNITS = {"": 1, "k": 1_000, "m": 1_000_000}
SIZE = re.compile(r"(\d+(?:\.\d+)?)([km]?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512' -> 512, '4k' -> 4000, '1.5k' -> 1500, '1M' -> 1000000; anything else is a ValueError."""
    match = SIZE.fullmatch(text.strip())
    value = Decimal(match[1]) * UNITS[match[2].lower()] if match else None
    if value is None or value != value.to_integral_value():
        raise ValueError(f"bad size {text!r}: use a whole number of tokens such as 512, 4k, 160k or 1M")
    return int(value)


def format_size(tokens: int) -> str:
    """The short form: 4000 -> '4k', 1500 -> '1.5k', 512 -> '512', 1000000 -> '1M'."""
    for suffix, unit in (("M", 1_000_000), ("k", 1_000)):
        if tokens >= unit and tokens * 10 % unit == 0:
            return f"{tokens / unit:g}{suffix}"
    return str(tokens)


def parse_points(text: str) -> list[int]:
    """'0,1k,4k' -> [0, 1000, 4000]: sorted, without duplicates."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--points is empty: give distances such as 0,1k,4k,16k")
    return sorted({parse_size(item) for item in items})


def default_points(max_distance: int) -> list[int]:
    """0, then 1k, 2k, 4k, ... (doubling) below max_distance, then max_distance itself."""
    points, step = [0], 1_000
    while step < max_distance:
        points.append(step)
        step *= 2
    return points + [max_distance] if max_distance > 0 else points
