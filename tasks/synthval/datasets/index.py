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

from synthval.errors import DatasetError

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its ground truth.

    `boxes` is float32 (N, 4) in pixels, xyxy, origin top-left; `labels` is int64 (N,) holding the
    dataset's own label ids, named by `DatasetIndex.label_names`.
    """

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class DatasetIndex:
    """A dataset as read from disk: `label_names` maps the dataset's label ids to names."""

    root: str
    format: str
    label_names: dict[int, str]
    images: list[ImageRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: list[int] | np.ndarray) -> DatasetIndex:
        """Return an index over the images at `positions`, in that order."""
        return DatasetIndex(self.root, self.format, dict(self.label_names), [self.images[i] for i in positions])

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
    `boxes_xywh[box_offsets[i]:box_offsets[i + 1]]` in pixels with dataset label ids `labels[...]`.
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
    split_files: dict[str, str] = field(default_factory=dict)

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
        self.image_where: list[str] = []
        self.box_where: list[str] = []

    def add_image(self, path: str, width: int, height: int, image_where: str, box_where: str) -> None:
        """Start a new image; the boxes added next belong to it until the next `add_image`."""
        self.offsets.append(self.offsets[-1])
        self.paths.append(path)
        self.sizes += (width, height)
        self.image_where.append(image_where)
        self.box_where.append(box_where)

    def add_box(self, x: float, y: float, w: float, h: float, label: int, ref: int) -> None:
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
        )

    def _sizes(self, root: str) -> np.ndarray:
        """(width, height) per image as int64; a size beyond `MAX_IMAGE_SIDE` raises DatasetError naming it."""
        sizes = np.array(self.sizes, dtype=object).reshape(-1, 2)
        for i, (width, height) in enumerate(sizes.tolist()):
            if not (0 <= width <= MAX_IMAGE_SIDE and 0 <= height <= MAX_IMAGE_SIDE):
                raise DatasetError(f"{os.path.join(root, self.image_where[i])}: size {_shown(width)}x{_shown(height)} "
                                   f"is out of range; an image side is 1 to {MAX_IMAGE_SIDE} pixels")
        return sizes.astype(np.int64)

    def _locate_bad_value(self, root: str, coord_names: tuple[str, ...], label_field: str) -> DatasetError:
        # Only runs once packing failed: find the first value that is not a number and say where it is.
        offsets = np.array(self.offsets, dtype=np.int64)
        for j, label in enumerate(self.labels):
            bad = None
            if not _is_number(label) or isinstance(label, float) and not float(label).is_integer():
                bad = (label_field, label)
            else:
                for k in range(4):
                    value = self.coords[4 * j + k]
                    if not _is_number(value):
                        bad = (coord_names[k], value)
                        break
            if bad is not None:
                i = int(np.searchsorted(offsets, j, side="right")) - 1
                where = os.path.join(root, self.box_where[i].format(self.refs[j]))
                return DatasetError(f"{where}: field {bad[0]!r} must be a number, got {_shown(bad[1])}")
        return DatasetError(f"{root}: box values could not be read as numbers")


# No camera writes an image side of 2**16 pixels or more; the pixel count has its own limit (loader.py).
MAX_IMAGE_SIDE = 65535


def _is_number(value: Any) -> bool:
    """A JSON number a float64 holds (an int too large for one is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    """A value for an error message, cut short: an integer of thousands of digits stays one short line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def natural_key(name: str) -> list:
    """Sort key that orders "captures_99.json" before "captures_100.json" and "sequence.2" before "sequence.10"."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


def read_json_file(path: str) -> Any:
    """Parse a local JSON file strictly (`storage.decode_json`); anything wrong raises DatasetError naming it."""
    from synthval.storage import decode_json

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
