"""Errors the library raises. Only the CLI turns them into exit codes and one line on stderr."""


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
