"""Checkpoints: save, load (never executing pickled code), list, prune, lock the folder, describe what they hold.

A synthval checkpoint is one dict (see `FORMAT_VERSION`): model, optimizer, scheduler and scaler state,
epoch and step counters, RNG states, the resolved config, the label names, the package version. It is
written atomically as `<checkpoint_dir>/checkpoint-<step>.pt`; the newest is found by listing the folder,
so a pod that died half-way through a write leaves nothing a reader could mistake for a checkpoint.

The seed's published `FasterRCNN.estimator` files hold `{"model": state_dict, "config": CfgNode}`, written
by torch 1.4 in the legacy (non-zip) format, the config a pickled yacs object. Every load goes through
torch's weights-only unpickler, which builds only tensors and plain containers; the one class it is told
about, `yacs.config.CfgNode`, is replaced by a stand-in that becomes a plain dict, so yacs is neither
needed nor run. Published models are accepted by name wherever a checkpoint URI is (see
`synthval.io.sources.NAMED_SOURCES`); they are downloaded once into a local cache.

One training at a time per checkpoint folder: `CheckpointDirLock` refuses a second one, naming the first.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import pickle
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from synthval import __version__
from synthval.errors import CheckpointError, ConfigError, FetchError
from synthval.io import storage
from synthval.io.sources import is_named_model, local_model_file

log = logging.getLogger(__name__)

FORMAT = "synthval-checkpoint"
FORMAT_VERSION = 2  # 2: random states per process ("rng": {"ranks": [...]}), effective batch
_NAME_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
# What storage.atomic_output leaves behind when the writing process is killed mid-write.
_PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.pt\..*\.tmp$")


class _ConfigNodeStandIn:
    """Takes the place of yacs.config.CfgNode while unpickling: yields an OrderedDict, runs no yacs code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - called by the unpickler's NEWOBJ
        return OrderedDict()


# Exact global names that may appear in a checkpoint besides torch's own tensor machinery.
_SAFE_GLOBALS = [(_ConfigNodeStandIn, "yacs.config.CfgNode")]


def checkpoint_uri(checkpoint_dir_uri: str, step: int) -> str:
    return storage.join_uri(checkpoint_dir_uri, f"checkpoint-{step}.pt")


def _plain(obj: Any) -> Any:
    """Turn the unpickled config (OrderedDicts from the stand-in, tuples, sets) into plain JSON-like data."""
    if isinstance(obj, Mapping) and not isinstance(obj, torch.Tensor):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, set):
        return sorted(obj, key=repr)
    return obj


def save_checkpoint(uri: str, state: dict) -> None:
    """Write `state` to `uri` atomically: a reader sees the whole checkpoint or none."""
    with storage.atomic_output(uri) as tmp:
        torch.save(state, tmp)
    log.info("saved checkpoint %s", uri)


def load_checkpoint(uri: str) -> dict:
    """Return the checkpoint's dict with tensors on the CPU. Never executes pickled code.

    `uri` is a file or URI, or a published model's name (fetched once into a local cache). A missing
    file, a file that is no torch checkpoint, or one that would need any class or function outside the
    allow-list (tensors, plain containers, yacs' CfgNode as data) raises CheckpointError.
    """
    try:
        if is_named_model(uri):
            source: Any = local_model_file(uri)
        elif storage.is_local(uri):
            source = storage.local_path(uri)
        else:
            source = io.BytesIO(storage.read_bytes(uri))
    except FetchError as exc:
        raise CheckpointError(f"{uri}: cannot read the checkpoint ({exc})") from exc
    if isinstance(source, str) and not os.path.isfile(source):
        raise CheckpointError(f"{uri}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{uri}: refused to load: the checkpoint holds objects other than tensors and plain data, "
            f"and loading it could run code ({_unpickling_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{uri}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{uri}: expected a dict in the checkpoint, found {type(state).__name__}")
    state = dict(state)
    if "config" in state and isinstance(state["config"], Mapping):
        state["config"] = _plain(state["config"])
    return state


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that names the refused global (not its advice to turn it off)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line or "Can only" in line:
            return line
    return lines[-1] if lines else type(exc).__name__


def list_checkpoints(checkpoint_dir_uri: str) -> list[tuple[int, str]]:
    """Return (step, uri) of every finished checkpoint in the folder, oldest first."""
    try:
        fs, path = storage.filesystem(checkpoint_dir_uri)
        if not fs.exists(path):
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = _NAME_RE.match(name)
        if match:
            found.append((int(match.group(1)), storage.join_uri(checkpoint_dir_uri, name)))
    return sorted(found)


def remove_partial_checkpoints(checkpoint_dir_uri: str) -> None:
    """Delete temporary files of checkpoint writes that a killed process left in a local folder.

    Call only while holding the folder's `CheckpointDirLock`: another training's in-flight write must
    never be taken for a dead one's.
    """
    if not storage.is_local(checkpoint_dir_uri):
        return  # remote checkpoints are staged locally and put as one object: nothing is left behind
    folder = storage.local_path(checkpoint_dir_uri)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if _PARTIAL_RE.match(name):
            log.info("removing %s, left by a checkpoint write that did not finish", name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


LOCK_NAME = ".synthval-train.lock"


class CheckpointDirLockedError(CheckpointError):
    """Another training holds the checkpoint folder."""


class CheckpointDirLock:
    """One training per local checkpoint folder: a kernel lock (flock) on `<folder>/.synthval-train.lock`,
    whose content names the holder (host, pid, start time) for the error a second training gets.

    The kernel drops a flock when its process dies, however it dies, so a lock file left by a process that
    is gone is taken over (a warning names it) and never blocks a retried pod. An object store (gs://) has
    no lock; there Airflow's one try at a time per task keeps trainings apart.
    """

    def __init__(self, checkpoint_dir_uri: str) -> None:
        self.uri = checkpoint_dir_uri
        self._fd: int | None = None
        self._path: str | None = None
        self._created_folder = False

    def acquire(self) -> None:
        """Take the lock, or raise CheckpointDirLockedError naming the training that holds it."""
        if not storage.is_local(self.uri):
            return
        folder = storage.local_path(self.uri)
        self._created_folder = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise CheckpointError(f"{path}: cannot lock the checkpoint folder ({exc})") from exc
                raise CheckpointDirLockedError(
                    f"{self.uri}: another training is writing to this checkpoint folder ({_describe_holder(holder)}, "
                    f"lock file {path}); wait for it to end or use another --checkpoint-dir") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder released and removed it between our open and our lock: try again
        previous = _read_holder(fd)
        if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            log.warning("taking over the lock of %s in %s: that process is gone", _describe_holder(previous),
                        self.uri)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd, self._path = fd, path

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so no one takes a file about to vanish) and drop it."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        os.close(self._fd)
        self._fd = None
        if self._created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self._path))  # only if this run wrote nothing there

    def __enter__(self) -> CheckpointDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started_at')}"


def prune_checkpoints(checkpoint_dir_uri: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for _, uri in list_checkpoints(checkpoint_dir_uri)[:-keep]:
        fs, path = storage.filesystem(uri)
        try:
            fs.rm(path)
            log.debug("removed old checkpoint %s", uri)
        except FileNotFoundError:
            pass


def is_synthval_checkpoint(state: Mapping) -> bool:
    return state.get("format") == FORMAT


def model_state_of(state: Mapping, uri: str) -> Mapping[str, torch.Tensor]:
    """Return the detector's state dict from a synthval, seed (`{"model": ...}`) or bare checkpoint."""
    model_state = state.get("model", state)
    if not isinstance(model_state, Mapping) or not any(
        isinstance(k, str) and k.endswith("box_predictor.cls_score.weight") for k in model_state
    ):
        raise CheckpointError(f"{uri}: no Faster R-CNN weights found (expected a 'model' state dict with "
                              "roi_heads.box_predictor.cls_score.weight)")
    return model_state


def describe(state: Mapping, uri: str) -> dict[str, Any]:
    """Return {"model_config": dict, "label_names": list | None, "metadata": dict} of any supported checkpoint.

    A seed checkpoint has no label names and no synthval config: its model is what torchvision 0.5's
    `fasterrcnn_<backbone>_fpn` built for the seed (estimators/faster_rcnn.py), whatever its config's
    `pretrained_backbone` says: FrozenBatchNorm2d with eps 0 throughout the backbone, layer2 to layer4
    trainable, torchvision's default sizes and thresholds.
    """
    from synthval.config import MODEL_NAMES

    if is_synthval_checkpoint(state):
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{uri}: checkpoint format version {version!r} is newer than this synthval "
                                  f"({__version__}) reads (up to {FORMAT_VERSION})")
        config = state.get("config") or {}
        metadata = {k: state.get(k) for k in ("config", "label_names", "epoch", "step", "synthval_version",
                                              "format_version", "metrics", "finished")}
        metadata["source_format"] = FORMAT
        return {"model_config": dict(config.get("model", {})), "label_names": list(state["label_names"]),
                "metadata": metadata}
    config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
    backbone = str(config.get("backbone", "resnet50"))
    name = f"{backbone}_fpn"
    if name not in MODEL_NAMES:
        raise CheckpointError(f"{uri}: seed checkpoint with backbone {backbone!r}; supported: resnet50")
    # The seed built torchvision's model with 100 detections and a 0.05 score threshold: our defaults.
    seed_model = {"name": name, "weights_backbone": "imagenet", "trainable_backbone_layers": 3,
                  "backbone_norm": "frozen", "frozen_bn_eps": 0.0}
    return {"model_config": seed_model, "label_names": None,
            "metadata": {"config": dict(config), "source_format": "datasetinsights" if config else "state_dict"}}


def model_config_from(model_config: Mapping[str, Any], uri: str):
    """Return a ModelConfig from a checkpoint's stored model config, ignoring keys this version lacks."""
    import dataclasses

    from synthval.config import ModelConfig, from_dict

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = sorted(set(model_config) - known)
    if extra:
        log.warning("%s: ignoring model config keys this version does not know: %s", uri, ", ".join(extra))
    try:
        return from_dict(ModelConfig, {k: v for k, v in model_config.items() if k in known})
    except ConfigError as exc:
        raise CheckpointError(f"{uri}: the stored model config is invalid ({exc})") from exc
