"""`synthval generate`: write a procedural "synthetic groceries" dataset. NOT real data.

Public datasets cannot be downloaded where synthval is built and tested, so the demo and the tests
use pictures drawn by `synthval.procedural` in the layouts of the datasets they stand in for:

- kind "synthetic", layout "perception": a Unity Perception dataset, schema 0.0.1, as SynthDet wrote
  it: `Dataset/annotation_definitions.json` (the SynthDet 2D-box definition id), `Dataset/captures_NNN.json`
  (150 captures per file, as Unity splits them), `Dataset/sensors.json`, `Dataset/egos.json`, and the
  PNG images under `RGB<guid>/rgb_N.png`.
- kind "synthetic", layout "solo": a Unity Perception SOLO dataset: `metadata.json`,
  `annotation_definitions.json`, `sensor_definitions.json`, `metric_definitions.json`,
  `sequence.N/step0.camera.png` and `sequence.N/step0.frame_data.json`.
- kind "real-proxy": the UnityGroceries-RealWorld v3 layout: `images/IMG_NNNN.JPG`, `annotations.json`,
  `annotation_definitions.json` and `groceries_real_<split>.txt` for train / val / test (the real
  set's 760 / 253 / 254 proportions) and train_small / train_medium (10% / 50% of train, nested).

Both kinds name the same ten labels, with different label ids on purpose (the real-proxy ids follow
the alphabetical order of the names), so that readers and training must match labels by name, as they
must between SynthDet and GroceriesReal. Every dataset also holds a `README.txt` saying that it is
procedural, and `_SUCCESS`, written last, holding the parameters it was made with.

Nothing appears at `out_uri` until the dataset is whole: a local dataset is written to a hidden
temporary folder beside it and renamed; a remote one is written locally, uploaded, and completed by
uploading `_SUCCESS` last (readers and watchers of object stores wait for that file). A repeated call
with the same parameters finds the finished dataset and returns at once, which is what a retried task
relies on. The same seed gives byte-identical annotation files and pixel-identical images.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np
from PIL import Image

from synthval import storage
from synthval.errors import ConfigError, DatasetError
from synthval.procedural import DOMAINS, LABEL_NAMES, REAL_PROXY, SYNTHETIC, Scene, render_scene

log = logging.getLogger(__name__)

KINDS = DOMAINS
LAYOUTS = ("perception", "solo")
SUCCESS_FILE = "_SUCCESS"
README_FILE = "README.txt"
SYNTHDET_BBOX_DEFINITION_ID = "c31620e3-55ff-4af6-ae86-884aa0daa9b2"
CAPTURES_PER_FILE = 150  # Unity Perception's default
PNG_COMPRESS_LEVEL = 1  # encoding dominates the write time at higher levels; files grow only ~15%

# The real GroceriesReal v3 split sizes; a generated set keeps their proportions.
REAL_SPLITS = {"train": 760, "val": 253, "test": 254}
REAL_TRAIN_SUBSETS = {"train_small": 76, "train_medium": 380}

SYNTHETIC_LABEL_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(LABEL_NAMES)}
REAL_LABEL_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(sorted(LABEL_NAMES))}

BBOX_DESCRIPTION = ("Produces 2D bounding box annotations for all visible objects that bear a label defined "
                    "in this labeler's associated label configuration.")
NOT_REAL = ("NOT real data: every image was drawn procedurally by synthval.generate (numpy/PIL shapes "
            "standing in for grocery items); numbers measured on it say nothing about real images.")

# Bump when the pixels or annotations a seed gives change: a finished dataset of another version is
# not taken for this one.
_GENERATOR_VERSION = "1"
_KIND_STREAM = {SYNTHETIC: 1, REAL_PROXY: 2}
_IDS_STREAM = 1 << 20  # a stream index no image uses, for GUIDs and split permutations


def run_generate(kind: str, out_uri: str, num_images: int, image_size: int = 256, seed: int = 0,
                 layout: str = "perception") -> dict:
    """Write a procedural dataset at `out_uri`; return {"dataset_uri", "num_images", "labels", ...}.

    `labels` is the number of label names; the result also names the `format` a reader should use
    ("perception", "solo" or "groceries") and the number of boxes written (`num_boxes`).
    """
    _validate(kind, num_images, image_size, seed, layout)
    fmt = "groceries" if kind == REAL_PROXY else layout
    params = {"kind": kind, "format": fmt, "num_images": num_images, "image_size": image_size, "seed": seed,
              "generator": "synthval.generate", "generator_version": _GENERATOR_VERSION}
    done = _finished_dataset(out_uri, params)
    if done is not None:
        log.info("generate: %s already holds this dataset (%s); nothing to do", out_uri, SUCCESS_FILE)
        return _result(out_uri, done)

    local = storage.is_local(out_uri)
    if local:
        final = storage.local_path(out_uri)
        parent = os.path.dirname(final) or "."
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    else:
        staging = tempfile.mkdtemp(prefix="synthval-generate-")
    try:
        num_boxes = _write_dataset(staging, kind, fmt, num_images, image_size, seed)
        record = {**params, "num_boxes": num_boxes, "labels": len(LABEL_NAMES), "note": NOT_REAL}
        with open(os.path.join(staging, SUCCESS_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if local:
            _publish_local(staging, final)
        else:
            _publish_remote(staging, out_uri)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    log.info("generate: wrote %d %s images (%d boxes) to %s", num_images, kind, num_boxes, out_uri)
    return _result(out_uri, record)


def _result(out_uri: str, record: dict) -> dict:
    return {"dataset_uri": out_uri, "num_images": record["num_images"], "labels": record["labels"],
            "num_boxes": record["num_boxes"], "format": record["format"]}


def _validate(kind: str, num_images: int, image_size: int, seed: int, layout: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"generate: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"generate: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    smallest = 3 if kind == REAL_PROXY else 1  # a real-proxy set needs one image in each of train, val, test
    if not isinstance(num_images, int) or num_images < smallest:
        raise ConfigError(f"generate: --num-images must be an integer >= {smallest} for kind {kind!r} "
                          f"(got {num_images!r})")
    if not isinstance(image_size, int) or not 64 <= image_size <= 4096:
        raise ConfigError(f"generate: --image-size must be an integer in [64, 4096] (got {image_size!r})")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"generate: --seed must be a non-negative integer (got {seed!r})")


# ----------------------------------------------------------------------------------------------
# Staging and publishing
# ----------------------------------------------------------------------------------------------

def _finished_dataset(out_uri: str, params: dict) -> dict | None:
    """Return the `_SUCCESS` record if `out_uri` already holds this very dataset; None if it is free.

    Raise DatasetError if it holds anything else, so that nothing of the user's is overwritten.
    """
    fs, path = storage.filesystem(out_uri)
    if not fs.exists(path):
        return None
    if not fs.isdir(path):
        raise DatasetError(f"generate: {out_uri} exists and is a file; choose another --out")
    marker = f"{path.rstrip('/')}/{SUCCESS_FILE}"
    if fs.exists(marker):
        try:
            record = json.loads(fs.cat_file(marker))
        except (ValueError, OSError):
            record = {}
        if all(record.get(k) == v for k, v in params.items()):
            return record
        raise DatasetError(
            f"generate: {out_uri} already holds a generated dataset made with other parameters "
            f"({ {k: record.get(k) for k in ('kind', 'format', 'num_images', 'image_size', 'seed')} }); "
            "choose another --out or delete it")
    entries = fs.ls(path, detail=False)
    if not entries:
        return None
    names = {os.path.basename(str(e).rstrip("/")) for e in entries}
    if not storage.is_local(out_uri) and README_FILE in names:
        # an upload of ours that died before `_SUCCESS`: start it again
        log.warning("generate: %s holds an unfinished upload; replacing it", out_uri)
        fs.rm(path, recursive=True)
        return None
    raise DatasetError(f"generate: {out_uri} is not empty and is not a generated dataset; "
                       "choose another --out or delete it")


def _publish_local(staging: str, final: str) -> None:
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)
    try:
        os.replace(staging, final)
    except OSError as exc:
        raise DatasetError(f"generate: cannot move the finished dataset to {final} ({exc})") from exc


def _publish_remote(staging: str, out_uri: str) -> None:
    """Upload README first and `_SUCCESS` last, so a watcher of the prefix sees a whole dataset or none."""
    fs, path = storage.filesystem(out_uri)
    base = path.rstrip("/")
    files = []
    for dirpath, _dirs, names in os.walk(staging):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), staging).replace(os.sep, "/")
            if rel not in (README_FILE, SUCCESS_FILE):
                files.append(rel)
    files.sort()
    fs.put_file(os.path.join(staging, README_FILE), f"{base}/{README_FILE}")
    if files:
        fs.put([os.path.join(staging, r) for r in files], [f"{base}/{r}" for r in files])
    fs.put_file(os.path.join(staging, SUCCESS_FILE), f"{base}/{SUCCESS_FILE}")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _write_dataset(root: str, kind: str, fmt: str, num_images: int, image_size: int, seed: int) -> int:
    """Render every image into `root` in layout `fmt`; return the number of boxes written."""
    writer_cls = {"perception": _PerceptionWriter, "solo": _SoloWriter, "groceries": _GroceriesWriter}[fmt]
    ids_rng = np.random.default_rng([seed, _KIND_STREAM[kind], _IDS_STREAM])
    writer = writer_cls(root, image_size, seed, ids_rng)
    with open(os.path.join(root, README_FILE), "w", encoding="utf-8") as f:
        f.write(f"{NOT_REAL}\n\nkind={kind} format={fmt} num_images={num_images} image_size={image_size} "
                f"seed={seed} generator_version={_GENERATOR_VERSION}\n")
    progress = _Progress(num_images, kind)
    num_boxes = 0
    for i in range(num_images):
        # one generator per image: an image depends on (seed, kind, index) alone
        scene = render_scene(np.random.default_rng([seed, _KIND_STREAM[kind], i]), image_size, kind)
        writer.add(i, scene)
        num_boxes += len(scene.boxes)
        progress.step()
    writer.finish()
    return num_boxes


class _Progress:
    """Log count, rate and ETA every few seconds, and once at the end."""

    def __init__(self, total: int, what: str, every_s: float = 5.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate
            log.info("generate %s: %d/%d images, %.0f images/s, ETA %.0f s", self.what, self.done,
                     self.total, rate, eta)


def _dump(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _guid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _save_png(path: str, scene: Scene) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(scene.image).save(path, "PNG", compress_level=PNG_COMPRESS_LEVEL)


def _spec(label_ids: dict[str, int]) -> list[dict]:
    return [{"label_id": label_ids[name], "label_name": name}
            for name in sorted(label_ids, key=label_ids.__getitem__)]


def _perception_definitions(label_ids: dict[str, int]) -> dict:
    return {"version": "0.0.1", "annotation_definitions": [{
        "id": SYNTHDET_BBOX_DEFINITION_ID, "name": "bounding box", "description": BBOX_DESCRIPTION,
        "format": "JSON", "spec": _spec(label_ids)}]}


class _PerceptionWriter:
    """Unity Perception 0.0.1, as SynthDet's BoundingBox2DLabeler wrote it."""

    def __init__(self, root: str, size: int, seed: int, ids: np.random.Generator) -> None:
        self.root, self.size, self.ids = root, size, ids
        self.dataset = os.path.join(root, "Dataset")
        self.sensor_id, self.ego_id = _guid(ids), _guid(ids)
        self.rgb_dir = f"RGB{_guid(ids)}"
        self.captures: list[dict] = []
        self.files = 0
        os.makedirs(self.dataset, exist_ok=True)
        focal = 1.0 / np.tan(np.radians(30.0))  # a 60 degree camera, for a plausible intrinsic matrix
        self.sensor = {
            "sensor_id": self.sensor_id, "ego_id": self.ego_id, "modality": "camera",
            "translation": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0],
            "camera_intrinsic": [[round(float(focal), 6), 0.0, 0.0], [0.0, round(float(focal), 6), 0.0],
                                 [0.0, 0.0, -1.0006]],
        }

    def add(self, i: int, scene: Scene) -> None:
        filename = f"{self.rgb_dir}/rgb_{i}.png"
        _save_png(os.path.join(self.root, filename), scene)
        names = [LABEL_NAMES[k] for k in scene.classes]
        values = [{"label_id": SYNTHETIC_LABEL_IDS[n], "label_name": n, "instance_id": int(inst),
                   "x": float(b[0]), "y": float(b[1]), "width": float(b[2] - b[0]), "height": float(b[3] - b[1])}
                  for n, inst, b in zip(names, scene.instance_ids, scene.boxes.tolist())]
        self.captures.append({
            "id": _guid(self.ids), "sequence_id": _guid(self.ids), "step": 0, "timestamp": 0.0,
            "sensor": self.sensor,
            "ego": {"ego_id": self.ego_id, "translation": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0],
                    "velocity": None, "acceleration": None},
            "filename": filename, "format": "PNG",
            "annotations": [{"id": _guid(self.ids), "annotation_definition": SYNTHDET_BBOX_DEFINITION_ID,
                             "values": values}],
        })
        if len(self.captures) == CAPTURES_PER_FILE:
            self._flush()

    def _flush(self) -> None:
        _dump(os.path.join(self.dataset, f"captures_{self.files:03d}.json"),
              {"version": "0.0.1", "captures": self.captures})
        self.files += 1
        self.captures = []

    def finish(self) -> None:
        if self.captures:
            self._flush()
        _dump(os.path.join(self.dataset, "annotation_definitions.json"), _perception_definitions(SYNTHETIC_LABEL_IDS))
        _dump(os.path.join(self.dataset, "sensors.json"), {"version": "0.0.1", "sensors": [{
            "id": self.sensor_id, "ego_id": self.ego_id, "modality": "camera",
            "description": "procedural camera of synthval.generate (not a real sensor)"}]})
        _dump(os.path.join(self.dataset, "egos.json"), {"version": "0.0.1", "egos": [{
            "id": self.ego_id, "description": "procedural scene of synthval.generate (NOT real data)"}]})


SOLO_CAMERA = "type.unity.com/unity.solo.RGBCamera"
SOLO_BBOX = "type.unity.com/unity.solo.BoundingBox2DAnnotation"


class _SoloWriter:
    """Unity Perception SOLO, key for key as in the pysolotools sample (shared/fixtures/solo)."""

    def __init__(self, root: str, size: int, seed: int, ids: np.random.Generator) -> None:
        self.root, self.size, self.seed = root, size, seed
        self.count = 0

    def add(self, i: int, scene: Scene) -> None:
        folder = os.path.join(self.root, f"sequence.{i}")
        _save_png(os.path.join(folder, "step0.camera.png"), scene)
        values = [{"instanceId": int(inst), "labelId": SYNTHETIC_LABEL_IDS[LABEL_NAMES[k]],
                   "labelName": LABEL_NAMES[k], "origin": [float(b[0]), float(b[1])],
                   "dimension": [float(b[2] - b[0]), float(b[3] - b[1])]}
                  for k, inst, b in zip(scene.classes.tolist(), scene.instance_ids, scene.boxes.tolist())]
        _dump(os.path.join(folder, "step0.frame_data.json"), {
            "frame": i, "sequence": i, "step": 0,
            "captures": [{
                "@type": SOLO_CAMERA, "id": "camera", "description": "The main camera",
                "position": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0],
                "velocity": [0.0, 0.0, 0.0], "acceleration": [0.0, 0.0, 0.0],
                "filename": "step0.camera.png", "imageFormat": "Png",
                "dimension": [float(self.size), float(self.size)], "projection": "Perspective",
                "matrix": [1.732051, 0.0, 0.0, 0.0, 1.732051, 0.0, 0.0, 0.0, -1.0006],
                "annotations": [{"@type": SOLO_BBOX, "id": "bounding box", "sensorId": "camera",
                                 "description": BBOX_DESCRIPTION, "values": values}],
            }],
            "metrics": [],
        })
        self.count += 1

    def finish(self) -> None:
        _dump(os.path.join(self.root, "annotation_definitions.json"), {"annotationDefinitions": [{
            "@type": SOLO_BBOX, "id": "bounding box", "description": BBOX_DESCRIPTION,
            "spec": _spec(SYNTHETIC_LABEL_IDS)}]})
        _dump(os.path.join(self.root, "sensor_definitions.json"), {"sensorDefinitions": [{
            "@type": SOLO_CAMERA, "id": "camera", "modality": "camera", "definition": "The main camera",
            "firstCaptureFrame": 0.0, "captureTriggerMode": "Scheduled", "simulationDeltaTime": 0.0166,
            "framesBetweenCaptures": 0, "manualSensorsAffectTiming": False}]})
        _dump(os.path.join(self.root, "metric_definitions.json"), {"metricDefinitions": []})
        _dump(os.path.join(self.root, "metadata.json"), {
            # no Unity involved: say so where Unity would name itself
            "unityVersion": "none (synthval.generate, procedural, NOT real data)",
            "perceptionVersion": "none", "renderPipeline": "synthval.procedural",
            "simulationStartTime": "1/1/2024 12:00:00 AM", "scenarioRandomSeed": self.seed,
            "scenarioActiveRandomizers": [], "totalFrames": self.count, "totalSequences": self.count,
            "sensors": ["camera"], "metricCollectors": [], "simulationEndTime": "1/1/2024 12:00:00 AM",
            "annotators": [{"name": "bounding box", "type": SOLO_BBOX}],
        })


class _GroceriesWriter:
    """UnityGroceries-RealWorld v3: JPEG images, one annotations list, index split files."""

    def __init__(self, root: str, size: int, seed: int, ids: np.random.Generator) -> None:
        self.root, self.ids = root, ids
        self.annotations: list[dict] = []
        os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def add(self, i: int, scene: Scene) -> None:
        file_name = f"IMG_{i + 1:04d}.JPG"
        Image.fromarray(scene.image).save(os.path.join(self.root, "images", file_name), "JPEG",
                                          quality=scene.jpeg_quality or 75)
        self.annotations.append({"file_name": file_name, "annotations": [
            {"label_id": REAL_LABEL_IDS[LABEL_NAMES[k]], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for k, b in zip(scene.classes.tolist(), scene.boxes.tolist())]})

    def finish(self) -> None:
        _dump(os.path.join(self.root, "annotations.json"), self.annotations)
        _dump(os.path.join(self.root, "annotation_definitions.json"), _perception_definitions(REAL_LABEL_IDS))
        for split, indices in split_indices(len(self.annotations), self.ids).items():
            with open(os.path.join(self.root, f"groceries_real_{split}.txt"), "w", encoding="utf-8") as f:
                f.write("".join(f"{i}\n" for i in indices))


def split_indices(n: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Split n images like GroceriesReal v3: train / val / test in 760 : 253 : 254, each non-empty for
    n >= 3, and train_small (10%) inside train_medium (50%) inside train. Indices sorted per split."""
    total = sum(REAL_SPLITS.values())
    n_val = max(1, int(n * REAL_SPLITS["val"] / total + 0.5))
    n_test = max(1, int(n * REAL_SPLITS["test"] / total + 0.5))
    n_train = n - n_val - n_test
    order = rng.permutation(n)
    train = order[:n_train]
    splits = {"train": train, "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for name, size in REAL_TRAIN_SUBSETS.items():
        splits[name] = train[:max(1, int(n_train * size / REAL_SPLITS["train"] + 0.5))]
    return {name: sorted(int(i) for i in idx) for name, idx in splits.items()}
