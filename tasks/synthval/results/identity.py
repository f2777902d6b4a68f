"""Which model a result is of: its identity (by content) and its role (what it was trained on).

A result is one (model, protocol). The model is identified by what it is, never by where a run put it:

- a checkpoint file: SHA-256 of what it holds, streamed in chunks (`checkpoint-sha256`; for torch's zip
  format, its records, whatever temporary name the archive was first written under). A retried task or
  a cleared DAG run evaluates the very same checkpoint (`train --resume auto` returns the finished one), a
  deterministic re-training writes the same records again: both update their row; two different
  checkpoints never share one.
- a published model name (`synthetic-400k`, ... from `io.sources.NAMED_SOURCES`): the name (`name`), whose
  content its publisher fixed; nothing is downloaded to identify it.
- a COCO results file scored without a model: SHA-256 of that file (`predictions-sha256`).
- a file that can no longer be read: its URI (`uri`), with a warning.

Roles follow what the model was trained on, from publish's `--dataset ROLE=URI` (synthetic, real, model)
and `--real-budget`:

| role | trained on | row's dataset |
| --- | --- | --- |
| `synthetic` | a synthetic dataset only (real budget 0) | the synthetic dataset |
| `synthetic+real` | a synthetic dataset, then fine-tuned on `real_budget` real images | the synthetic dataset |
| `real` | real images only: a point of the real-only learning curve | the real dataset |
| `model` | a given model, evaluated as it is | the model (name or URI) |
| `model+real` | a given model fine-tuned on `real_budget` real images | the given model |

`real=URI` alone names the real dataset the test split came from; it is training data only with a
real budget above 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from synthval.errors import ConfigError
from synthval.io import storage
from synthval.io.sources import is_named_source
from synthval.scoring.protocol import CHUNK_BYTES, sha256_of

log = logging.getLogger(__name__)

DATASET_ROLES = ("synthetic", "real", "model")
ROLES = ("synthetic", "synthetic+real", "real", "model", "model+real")
REAL_ONLY = "real"


def normalize_uri(uri: str) -> str:
    """One spelling per dataset or model: local paths absolute, no trailing slash, gcs:// as gs://,
    published names (`synthdet-sample`, `synthetic-400k`) as they are."""
    uri = uri.strip()
    if is_named_source(uri):
        return uri
    if storage.is_local(uri):
        return storage.local_path(uri).rstrip(os.sep) or os.sep
    if uri.startswith("gcs://"):
        uri = "gs://" + uri[len("gcs://"):]
    return uri.rstrip("/")


def model_role(datasets: Mapping[str, str], real_budget: int | None) -> tuple[str, str | None]:
    """(role, dataset) of a model from publish's datasets by role and its real budget (see the table above).

    The dataset is None for a model whose origin was not told (no synthetic or model dataset, no real
    budget): the caller names it by its checkpoint.
    """
    unknown = sorted(set(datasets) - set(DATASET_ROLES))
    if unknown:
        raise ConfigError(f"publish: dataset role {unknown[0]!r} is unknown; expected {', '.join(DATASET_ROLES)}")
    tuned = bool(real_budget)
    if tuned and not datasets.get("real"):
        raise ConfigError(f"publish: real budget {real_budget} needs the real dataset it came from (--dataset real=URI)")
    if datasets.get("synthetic"):
        if datasets.get("model"):
            raise ConfigError("publish: give either a synthetic dataset or a given model (--dataset model=...), "
                              "not both: the model was trained on one of them")
        return ("synthetic+real" if tuned else "synthetic"), normalize_uri(datasets["synthetic"])
    if datasets.get("model"):
        return ("model+real" if tuned else "model"), normalize_uri(datasets["model"])
    if tuned:
        return REAL_ONLY, normalize_uri(datasets["real"])
    return "model", None


def content_sha256(uri: str) -> str:
    """SHA-256 of what a file at a local or remote URI holds, streamed in chunks; FileNotFoundError if absent.

    A zip archive (torch's checkpoint format) is hashed by its members, names taken below the archive's
    top folder: torch names that folder after the file it first wrote, a temporary name when the write
    was atomic, so the same checkpoint saved twice differs in those bytes only. Any other file is
    hashed whole.
    """
    import hashlib
    import zipfile

    if storage.is_local(uri):
        opened = open(storage.local_path(uri), "rb")  # noqa: SIM115 - closed by the with below
    else:
        fs, path = storage.filesystem(uri)
        opened = fs.open(path, "rb", block_size=CHUNK_BYTES)
    digest = hashlib.sha256()
    with opened as f:
        if not zipfile.is_zipfile(f):
            f.seek(0)
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
            return digest.hexdigest()
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            tops = {m.filename.split("/", 1)[0] for m in members}
            strip = len(tops) == 1 and all("/" in m.filename for m in members)
            for member in sorted(members, key=lambda m: m.filename):
                name = member.filename.split("/", 1)[1] if strip else member.filename
                digest.update(f"{name}\0{member.file_size}\0".encode())
                with archive.open(member) as data:
                    while chunk := data.read(CHUNK_BYTES):
                        digest.update(chunk)
    return digest.hexdigest()


def model_identity(checkpoint_uri: str | None, predictions_uri: str | None) -> dict[str, Any]:
    """{"id", "basis", "uri"}: the model's identity (see the module docstring; `id` is 64 hex digits) and
    the checkpoint (or results file) it was read from, normalized."""
    from synthval.errors import FetchError

    source = checkpoint_uri or predictions_uri
    if not source:
        raise ConfigError("publish: the evaluation names neither a checkpoint nor a results file; "
                          "pass --checkpoint URI")
    uri = normalize_uri(source)
    if checkpoint_uri and is_named_source(checkpoint_uri):
        basis, value = "name", uri
    else:
        basis = "checkpoint-sha256" if checkpoint_uri else "predictions-sha256"
        try:
            value = content_sha256(source)
        except (OSError, FetchError, ValueError) as exc:
            log.warning("cannot read %s to identify the model by content (%s); identifying it by its URI",
                        source, exc)
            basis, value = "uri", uri
    return {"id": sha256_of({basis: value}), "basis": basis, "uri": uri}
