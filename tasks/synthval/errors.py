"""Errors the library raises, and how a bad value is shown in their one line. Only the CLI turns them into
exit codes and one line on stderr."""

import math
from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """A value for an error message, as the file wrote it where it can and cut short: an integer of
    thousands of digits stays one short line, a non-finite float is JSON's NaN / Infinity."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SynthvalError(Exception):
    """Base class. `exit_code` is what the CLI exits with: 2 for bad input, 1 otherwise."""

    exit_code = 1


class ConfigError(SynthvalError):
    """A config file, flag or `--set` override is unknown, of the wrong type or out of range."""

    exit_code = 2


class DatasetError(SynthvalError):
    """A dataset is malformed: bad JSON, a missing image, a bad box, an unknown label, no images."""

    exit_code = 2


class FetchError(SynthvalError):
    """A source cannot be fetched: unreachable URI, checksum mismatch, hostile or oversized archive."""

    exit_code = 2


class OutputError(SynthvalError):
    """An output cannot be written: a file where a folder goes, a read-only or full disk, a bad device."""

    exit_code = 2


class CheckpointError(SynthvalError):
    """A checkpoint is missing, of an unknown structure, or carries code that will not be executed."""

    exit_code = 2


class TrainingDivergedError(SynthvalError):
    """The loss became NaN or infinite; training stops rather than write a useless checkpoint."""

    exit_code = 1
