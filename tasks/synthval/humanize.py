"""Numbers as people read them, one spelling for every log line and report: metrics, intervals, byte sizes
and durations."""

from __future__ import annotations

import math
from typing import Any


def format_size(n: float) -> str:
    """`512 B`, `1.5 MiB`, ... up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_duration(seconds: float) -> str:
    """`H:MM:SS`, or `?` for an unknown (infinite or NaN) time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_number(value: Any, digits: int = 3) -> str:
    """`value` with `digits` decimals; "n/a" for None, NaN and infinities."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_interval(low: Any, high: Any) -> str:
    """`[low, high]` with 3 decimals; "n/a" unless both ends are finite."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{low:.3f}, {high:.3f}]"
