"""Numbers as people read them in progress lines: byte sizes and durations, one spelling for every log."""

from __future__ import annotations

import math


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
