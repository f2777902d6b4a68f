"""The one in-memory index every reader produces: images, sizes, boxes and labels, no pixels."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.errors import DatasetError, shown

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its ground truth: every annotation of the dataset, none dropped.

    `boxes` is float32 (N, 4) in pixels, xyxy, origin top-left, clipped to the image (what a model
    trains on); `labels` is int64 (N,) holding the dataset's own label ids, named by
    `DatasetIndex.label_names`. For scoring, box j is also kept exactly as the file gives it:
    `xywh[j]` float64 [x, y, width, height], `area[j]` the annotation's area (COCO `area`, else the box
    area) that decides COCO's small/medium/large, `iscrowd[j]` whether it marks a crowd region rather
    than one object, and `ignore[j]` the annotation's own `ignore` flag. Left out, they default to the
    box as given, its area, and no crowd or ignore flags (what every format but COCO holds).
    """

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    xywh: np.ndarray | None = None
    area: np.ndarray | None = None
    iscrowd: np.ndarray | None = None
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.xywh is None:
            b = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
            object.__setattr__(self, "xywh", np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1))
        if self.area is None:
            object.__setattr__(self, "area", self.xywh[:, 2] * self.xywh[:, 3])
        for name in ("iscrowd", "ignore"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n, dtype=bool))


@dataclass
class DatasetIndex:
    """A dataset as read from disk: `label_names` maps the dataset's label ids to names.

    `source_ids` maps image ids to the ids the dataset's own files give images where those differ
    (a COCO file's `images[].id`; image ids here are positions), so results files can use them.
    """

    root: str
    format: str
    label_names: dict[int, str]
    images: list[ImageRecord] = field(default_factory=list)
    source_ids: dict[int, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: list[int] | np.ndarray) -> DatasetIndex:
        """Return an index over the images at `positions`, in that order."""
        images = [self.images[i] for i in positions]
        ids = {r.image_id: self.source_ids[r.image_id] for r in images if r.image_id in self.source_ids}
        return DatasetIndex(self.root, self.format, dict(self.label_names), images, ids)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.boxes) for r in self.images)

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every image, from the index alone (never by decoding pixels)."""
        return np.array([r.width / r.height for r in self.images], dtype=np.float64)


# --- What the readers hand to the loader -------------------------------------------------------------
# A reader turns a dataset's files into one `RawIndex`: flat arrays, no per-image objects, nothing
# checked against the image files yet. The loader then picks the split, checks only the images it keeps
# (file present and non-empty, boxes inside the image, labels known) and builds the `DatasetIndex`.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class RawIndex:
    """A dataset as a reader found it, before splitting and checking.

    Image i has path `paths[i]` (absolute), size `sizes[i]` = (width, height) or (0, 0) where the format
    does not record it (the loader then reads the image header), and boxes
    `boxes_xywh[box_offsets[i]:box_offsets[i + 1]]` in pixels with dataset label ids `labels[...]`,
    annotation areas `areas[...]` (the box area where the format gives none), and crowd and ignore
    flags `iscrowd[...]`, `ignore[...]` (COCO only; False elsewhere). `image_ids` holds the ids the
    files give images where they have their own (COCO `images[].id`), else None.
    For error messages, `image_where[i]` says where image i is named (file and JSON path) and
    `box_where[i].format(box_refs[j])` where its box j is.
    `split_files` maps split names the dataset defines itself to their files (GroceriesReal).
    """

    root: str
    format: str
    label_names: dict[int, str]
    paths: list[str]
    sizes: np.ndarray
    box_offsets: np.ndarray
    boxes_xywh: np.ndarray
    labels: np.ndarray
    box_refs: np.ndarray
    image_where: list[str]
    box_where: list[str]
    areas: np.ndarray
    iscrowd: np.ndarray
    ignore: np.ndarray
    split_files: dict[str, str] = field(default_factory=dict)
    image_ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.paths)


class RawIndexBuilder:
    """Collects images and boxes in flat Python lists (cheap appends) and packs them into a RawIndex."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.sizes: list[int] = []  # width, height, width, height, ...
        self.offsets: list[int] = [0]
        self.coords: list[float] = []  # x, y, w, h, x, y, w, h, ...
        self.labels: list[int] = []
        self.refs: list[int] = []
        # COCO's per-box extras, by box row, only where given: readers may append boxes directly.
        self.areas: dict[int, Any] = {}
        self.flags: dict[int, tuple[Any, Any]] = {}  # (iscrowd, ignore) where either is set
        self.image_where: list[str] = []
        self.box_where: list[str] = []

    def add_image(self, path: str, width: int, height: int, image_where: str, box_where: str) -> None:
        """Start a new image; the boxes added next belong to it until the next `add_image`."""
        self.offsets.append(self.offsets[-1])
        self.paths.append(path)
        self.sizes += (width, height)
        self.image_where.append(image_where)
        self.box_where.append(box_where)

    def add_box(self, x: float, y: float, w: float, h: float, label: int, ref: int, area: Any = None,
                iscrowd: Any = 0, ignore: Any = 0) -> None:
        """Add a box of the current image; `area` None means the box's own area."""
        if area is not None:
            self.areas[len(self.labels)] = area
        if iscrowd or ignore:
            self.flags[len(self.labels)] = (iscrowd, ignore)
        self.coords += (x, y, w, h)
        self.labels.append(label)
        self.refs.append(ref)
        self.offsets[-1] += 1

    def build(self, root: str, format: str, label_names: dict[int, str],
              coord_names: tuple[str, str, str, str] = ("x", "y", "width", "height"),
              label_field: str = "label_id") -> RawIndex:
        """Pack the lists into arrays; a non-numeric coordinate or label raises DatasetError naming it."""
        # Let numpy infer the dtype: anything but plain JSON numbers (null, strings, lists) shows up as a
        # non-numeric dtype, and only then do we walk the values to name the culprit.
        boxes = np.array(self.coords) if self.coords else np.zeros(0)
        labels = np.array(self.labels) if self.labels else np.zeros(0, dtype=np.int64)
        if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        if boxes.dtype.kind not in "iuf" or labels.dtype.kind not in "iu" or boxes.dtype == bool:
            raise self._locate_bad_value(root, coord_names, label_field)
        boxes = boxes.astype(np.float64, copy=False).reshape(-1, 4)
        labels = labels.astype(np.int64, copy=False)
        areas, iscrowd, ignore = self._scoring_fields(boxes)
        return RawIndex(
            root=root,
            format=format,
            label_names=label_names,
            paths=self.paths,
            sizes=self._sizes(root),
            box_offsets=np.array(self.offsets, dtype=np.int64),
            boxes_xywh=boxes,
            labels=labels,
            box_refs=np.array(self.refs, dtype=np.int64),
            image_where=self.image_where,
            box_where=self.box_where,
            areas=areas,
            iscrowd=iscrowd,
            ignore=ignore,
        )

    def _sizes(self, root: str) -> np.ndarray:
        """(width, height) per image as int64; a size beyond `MAX_IMAGE_SIDE` raises DatasetError naming it."""
        sizes = np.array(self.sizes, dtype=object).reshape(-1, 2)
        for i, (width, height) in enumerate(sizes.tolist()):
            if not (0 <= width <= MAX_IMAGE_SIDE and 0 <= height <= MAX_IMAGE_SIDE):
                raise DatasetError(f"{os.path.join(root, self.image_where[i])}: size {shown(width)}x{shown(height)} "
                                   f"is out of range; an image side is 1 to {MAX_IMAGE_SIDE} pixels")
        return sizes.astype(np.int64)

    def _scoring_fields(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Areas (the box area where none is given) and crowd / ignore flags; a bad value names its box."""
        areas = boxes[:, 2] * boxes[:, 3]
        for j, value in self.areas.items():
            area = _finite_float(value)
            if area is None:
                raise self._box_error(j, f"field 'area' must be a finite number, got {shown(value)}")
            areas[j] = area
        iscrowd = np.zeros(len(self.labels), dtype=bool)
        ignore = np.zeros(len(self.labels), dtype=bool)
        for j, (crowd, ign) in self.flags.items():
            for name, value in (("iscrowd", crowd), ("ignore", ign)):
                if _finite_float(value) is None:
                    raise self._box_error(j, f"field {name!r} must be 0 or 1, got {shown(value)}")
            iscrowd[j], ignore[j] = bool(crowd), bool(ign)
        return areas, iscrowd, ignore

    def _box_error(self, j: int, message: str) -> DatasetError:
        i = int(np.searchsorted(np.array(self.offsets, dtype=np.int64), j, side="right")) - 1
        return DatasetError(f"{self.box_where[i].format(self.refs[j])}: {message}")

    def _locate_bad_value(self, root: str, coord_names: tuple[str, ...], label_field: str) -> DatasetError:
        # Only runs once packing failed: find the first value that is not a number and say where it is.
        offsets = np.array(self.offsets, dtype=np.int64)
        for j, label in enumerate(self.labels):
            bad = None
            if not is_finite_number(label) or isinstance(label, float) and not float(label).is_integer():
                bad = (label_field, label)
            else:
                for k in range(4):
                    value = self.coords[4 * j + k]
                    if not is_finite_number(value):
                        bad = (coord_names[k], value)
                        break
            if bad is not None:
                i = int(np.searchsorted(offsets, j, side="right")) - 1
                where = os.path.join(root, self.box_where[i].format(self.refs[j]))
                return DatasetError(f"{where}: field {bad[0]!r} must be a number, got {shown(bad[1])}")
        return DatasetError(f"{root}: box values could not be read as numbers")


# No camera writes an image side of 2**16 pixels or more; the pixel count has its own limit (loader.py).
MAX_IMAGE_SIDE = 65535


def is_finite_number(value: Any) -> bool:
    """A JSON number a float64 holds (an int too large for one is not)."""
    return not isinstance(value, bool) and _finite_float(value) is not None


def _finite_float(value: Any) -> float | None:
    """`value` as a float if it is a finite JSON number (bools count as 0 and 1), else None."""
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range, e.g. 10**400
        return None
    return number if math.isfinite(number) else None


def natural_key(name: str) -> list:
    """Sort key that orders "captures_99.json" before "captures_100.json" and "sequence.2" before "sequence.10"."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


def read_json_file(path: str) -> Any:
    """Parse a local JSON file strictly (`storage.decode_json`); anything wrong raises DatasetError naming it."""
    from synthval.io.storage import decode_json

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return decode_json(data, path, DatasetError)


def field_error(where: str, exc: Exception, value: Any = None) -> DatasetError:
    """A DatasetError for a missing or mistyped field, from the KeyError/TypeError/ValueError a reader hit."""
    if isinstance(exc, KeyError):
        return DatasetError(f"{where}: missing field {exc}")
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return DatasetError(f"{where}: unexpected value {shown} ({exc})")


class Progress:
    """Logs "<what>: k of n <unit> (rate/s, about s left)" every `every` seconds; silent for short jobs."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, every: float = 10.0) -> None:
        self.logger, self.what, self.total, self.unit, self.every = logger, what, total, unit, every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        self.logger.info("%s: %d of %d %s (%.0f/s, about %.0f s left)", self.what, done, self.total, self.unit,
                         rate, left)
