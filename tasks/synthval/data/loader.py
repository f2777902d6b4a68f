"""`load_dataset`: find the format, read it, pick the split and budget, check what is kept, build the index.
`load_ground_truth`: the same index from the annotations alone, for scoring detections that exist.

Reading is cheap and whole (JSON only); checking touches the image files, so it is done only when a
model will see the images (`load_dataset`), and only for the images the split and budget keep: each
must exist and be non-empty, its size comes from the annotations or else from the image header (never
from decoding pixels), and each box must lie inside the image (within `BOX_TOLERANCE_PX`, then
clipped for the model; scoring uses it as given) with positive width and height. Label ids are
checked for the whole dataset: one unknown id means the definitions do not describe the data.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable

import numpy as np

from synthval.data.index import DatasetIndex, ImageRecord, Progress, RawIndex
from synthval.data.readers.coco import annotation_files, read_coco
from synthval.data.readers.groceries import looks_like_groceries, read_groceries
from synthval.data.readers.perception import find_captures, read_perception
from synthval.data.readers.solo import find_sequences, read_solo
from synthval.data.splits import ALL, budget_order, split_positions
from synthval.errors import ConfigError, DatasetError
from synthval.io import storage

log = logging.getLogger(__name__)

FORMATS = ("perception", "solo", "coco", "groceries")
# Boxes may overhang the image by this much (rounding in the renderer or the annotator); they are clipped.
BOX_TOLERANCE_PX = 1.0
# The pixel count at which Pillow refuses to decode an image (DecompressionBombError: twice its
# MAX_IMAGE_PIXELS warning). Such an image is refused while indexing, before training starts, rather than
# when the data loader first decodes it.
MAX_IMAGE_PIXELS = 2 * 89_478_485
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LAYOUTS = ("GroceriesReal (annotations.json + annotation_definitions.json + groceries_real_*.txt)",
            "Perception 0.0.1 (captures_*.json in the folder or in Dataset/)",
            "SOLO (sequence.N/ folders)",
            "COCO (a .json file, or annotations/*.json beside images/)")


def load_dataset(uri: str, format: str = "auto", split: str | None = None, seed: int = 0,
                 max_images: int | None = None, bbox_definition_id: str | None = None,
                 skip_broken: bool = False) -> DatasetIndex:
    """Read the dataset at local `uri` into a checked DatasetIndex of the chosen split and budget.

    `format` is "auto" or one of FORMATS. `split` None/"all" is every image; GroceriesReal splits by its
    split files, other formats by a fixed 80/10/10 partition that `seed` does not change (see
    splits.py). `max_images` keeps that many images of the split, drawn by `seed`.
    `bbox_definition_id` picks the 2D-box annotation definition (Perception default: SynthDet's id).
    `skip_broken` leaves out images whose file is missing, empty or unreadable, or that have a box
    outside the image or of no area, with one warning naming them; without it the first such image
    raises DatasetError. Image ids are positions in the whole dataset (for COCO: in `images[]`), so
    they are unique across splits.
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ConfigError(f"max_images must be a positive integer or None, got {max_images!r}")
    start = time.monotonic()
    raw, positions = _read_split(uri, format, split, bbox_definition_id)
    what = f"split {split!r}" if split not in (None, "all") else "the dataset"
    if max_images is None:
        index = build_index(raw, positions, None, skip_broken, what)
    elif max_images > len(positions):
        raise DatasetError(f"{raw.root}: max_images={max_images} but {what} holds only {len(positions)} images")
    else:
        index = build_index(raw, budget_order(positions, seed), max_images, skip_broken, what)
    log.info("indexed %s (%s, %s%s): %d images, %d boxes, %d labels in %.1f s", raw.root, raw.format, what,
             f", {max_images} drawn by seed {seed}" if max_images else "", len(index), index.num_boxes,
             len(index.label_names), time.monotonic() - start)
    return index


def load_ground_truth(uri: str, format: str = "auto", split: str | None = None,
                      bbox_definition_id: str | None = None) -> DatasetIndex:
    """The annotations of `split` of the dataset at local `uri` as a DatasetIndex, from its JSON alone.

    For scoring detections that exist already: no image file is opened, every image of the split is
    kept, image sizes are the annotations' own ((0, 0) where the format records none), and boxes are
    taken as given (COCO scoring does not care whether a box leaves its image). A box with a
    non-finite coordinate is still an error, as is an unknown label.
    """
    start = time.monotonic()
    raw, positions = _read_split(uri, format, split, bbox_definition_id)
    rows, _ = _box_rows(raw, positions)
    bad = ~np.isfinite(raw.boxes_xywh[rows]).all(axis=1)
    if bad.any():
        j = int(rows[np.argmax(bad)])
        i = int(np.searchsorted(raw.box_offsets, j, side="right")) - 1
        raise DatasetError(f"{_where(raw, raw.box_where[i].format(raw.box_refs[j]))}: box "
                           f"{raw.boxes_xywh[j].tolist()} is not finite")
    index = _records(raw, positions, raw.sizes[positions])
    log.info("read the annotations of %s (%s, split %s): %d images, %d boxes in %.1f s", raw.root, raw.format,
             split, len(index), index.num_boxes, time.monotonic() - start)
    return index


def _read_split(uri: str, format: str, split: str | None, bbox_definition_id: str | None
                ) -> tuple[RawIndex, np.ndarray]:
    """Read the dataset at local `uri` and check its labels; return it and the positions of `split`."""
    if not storage.is_local(uri):
        raise DatasetError(f"{uri}: not a local dataset; fetch it first (synthval fetch) and read the local copy")
    path = storage.local_path(uri)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file or folder")
    if format == "auto":
        format = detect_format(path)
    elif format not in FORMATS:
        raise ConfigError(f"dataset format {format!r} is unknown; expected auto or one of {', '.join(FORMATS)}")
    raw = read_raw(path, format, bbox_definition_id)
    if len(raw) == 0:
        raise DatasetError(f"{path}: the {format} dataset holds no images")
    check_labels(raw)
    return raw, split_positions(raw, split)


def default_split(path: str, format: str, split: str | None, own: str = "test") -> str:
    """The split to use when none is named: the dataset's own split `own` ("train", "val", "test") where
    it defines splits (GroceriesReal), else every image: a synthetic set given for training is trained on
    whole, and a COCO folder given for evaluation is the test set."""
    if split is not None:
        return split
    fmt = detect_format(path) if format == "auto" else format
    return own if fmt == "groceries" else ALL


def detect_format(path: str) -> str:
    """The format of the dataset at local `path`, from its layout; none recognised -> DatasetError."""
    if os.path.isfile(path):
        if path.lower().endswith(".json"):
            return "coco"
        raise DatasetError(f"{path}: a file that is not .json; expected a dataset folder or a COCO .json file")
    if looks_like_groceries(path):
        return "groceries"
    if find_captures(path)[1]:
        return "perception"
    if find_sequences(path):
        return "solo"
    if annotation_files(path):
        return "coco"
    raise DatasetError(f"{path}: cannot tell the dataset format; looked for: {'; '.join(_LAYOUTS)}. "
                       "Pass the format explicitly if the layout differs.")


def read_raw(path: str, format: str, bbox_definition_id: str | None) -> RawIndex:
    """Run the reader for `format` on local `path`."""
    if format == "coco":
        if bbox_definition_id is not None:
            raise ConfigError("bbox_definition_id applies to Perception, SOLO and GroceriesReal, not COCO")
        return read_coco(path)
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: a {format} dataset is a folder")
    readers: dict[str, Callable[..., RawIndex]] = {
        "perception": read_perception, "solo": read_solo, "groceries": read_groceries}
    return readers[format](path, bbox_definition_id)


def check_labels(raw: RawIndex) -> None:
    """Every box's label id must be one the definitions name; else DatasetError at the first stranger."""
    known = np.fromiter(raw.label_names, dtype=np.int64, count=len(raw.label_names))
    unknown = ~np.isin(raw.labels, known)
    if not unknown.any():
        return
    j = int(np.argmax(unknown))
    i = int(np.searchsorted(raw.box_offsets, j, side="right")) - 1
    strangers = sorted(set(raw.labels[unknown].tolist()))
    raise DatasetError(f"{_where(raw, raw.box_where[i].format(raw.box_refs[j]))}: label id {raw.labels[j]} is "
                       f"not in the annotation definitions (known ids: {_short(sorted(raw.label_names))}); "
                       f"unknown ids in the dataset: {_short(strangers)}")


def build_index(raw: RawIndex, order: np.ndarray, budget: int | None, skip_broken: bool, what: str) -> DatasetIndex:
    """Check the images of `order` in turn and keep the usable ones, or the first `budget` usable ones
    (exactly that many, else DatasetError); the index lists them in dataset order."""
    want = len(order) if budget is None else budget
    kept: list[np.ndarray] = []
    kept_sizes: list[np.ndarray] = []
    broken: list[tuple[int, str]] = []
    n_kept = cursor = 0
    while n_kept < want and cursor < len(order):
        chunk = order[cursor:cursor + (want - n_kept)]
        cursor += len(chunk)
        sizes, problems = _check_files(raw, chunk)
        readable = np.flatnonzero([p is None for p in problems])
        for k, problem in _check_boxes(raw, chunk[readable], sizes[readable]).items():
            problems[int(readable[k])] = problem
        bad = [(int(chunk[k]), p) for k, p in enumerate(problems) if p is not None]
        if bad and not skip_broken:
            _, problem = min(bad)
            others = f" ({len(bad) - 1} more broken images among those checked)" if len(bad) > 1 else ""
            raise DatasetError(f"{problem}{others}. Pass skip_broken to leave broken images out.")
        broken += bad
        good = np.array([p is None for p in problems], dtype=bool)
        kept.append(chunk[good])
        kept_sizes.append(sizes[good])
        n_kept += int(good.sum())
    if broken:
        shown = "; ".join(p for _, p in sorted(broken)[:5])
        more = f"; and {len(broken) - 5} more" if len(broken) > 5 else ""
        log.warning("%s: skipped %d broken image(s) of %s: %s%s", raw.root, len(broken), what, shown, more)
    if n_kept == 0:
        raise DatasetError(f"{raw.root}: {what} has no usable images"
                           + (f" ({len(broken)} broken ones skipped)" if broken else ""))
    if budget is not None and n_kept < budget:
        raise DatasetError(f"{raw.root}: asked for {want} images of {what} but only {n_kept} are usable "
                           f"({len(broken)} broken)")
    positions = np.concatenate(kept)
    sizes = np.concatenate(kept_sizes)
    by_position = np.argsort(positions, kind="stable")
    return _records(raw, positions[by_position], sizes[by_position])


def _records(raw: RawIndex, positions: np.ndarray, sizes: np.ndarray) -> DatasetIndex:
    # One array per field for all kept boxes; each record holds views into them (no per-image copies).
    # Boxes are clipped to the image for the model; where the size is unknown (0) they are left as given.
    box_idx, counts = _box_rows(raw, positions)
    xywh = raw.boxes_xywh[box_idx]
    area, iscrowd, ignore = raw.areas[box_idx], raw.iscrowd[box_idx], raw.ignore[box_idx]
    width = np.repeat(np.where(sizes[:, 0] > 0, sizes[:, 0], np.inf), counts)
    height = np.repeat(np.where(sizes[:, 1] > 0, sizes[:, 1], np.inf), counts)
    xyxy = np.empty((len(box_idx), 4), dtype=np.float32)
    xyxy[:, 0] = np.clip(xywh[:, 0], 0, width)
    xyxy[:, 1] = np.clip(xywh[:, 1], 0, height)
    xyxy[:, 2] = np.clip(xywh[:, 0] + xywh[:, 2], 0, width)
    xyxy[:, 3] = np.clip(xywh[:, 1] + xywh[:, 3], 0, height)
    labels = raw.labels[box_idx]
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    records = [
        ImageRecord(image_id=p, path=raw.paths[p], width=w, height=h, boxes=xyxy[s:e], labels=labels[s:e],
                    xywh=xywh[s:e], area=area[s:e], iscrowd=iscrowd[s:e], ignore=ignore[s:e])
        for p, (w, h), s, e in zip(positions.tolist(), sizes.tolist(), starts, ends)
    ]
    source_ids = {} if raw.image_ids is None else {p: raw.image_ids[p] for p in positions.tolist()}
    return DatasetIndex(raw.root, raw.format, dict(raw.label_names), records, source_ids)


def _box_rows(raw: RawIndex, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers in raw.boxes_xywh of the boxes of `positions` (in that order), and the count per image."""
    starts = raw.box_offsets[positions]
    counts = raw.box_offsets[positions + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), counts
    # rows = start of each image's block + 0..count-1, without a Python loop
    block_starts = np.cumsum(counts) - counts
    rows = np.arange(total, dtype=np.int64) - np.repeat(block_starts - starts, counts)
    return rows, counts


def _check_files(raw: RawIndex, chunk: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Sizes (width, height) of the images at `chunk`, and a problem message or None per image."""
    sizes = raw.sizes[chunk].copy()
    problems: list[str | None] = [None] * len(chunk)
    paths, known = raw.paths, sizes[:, 0] > 0
    progress = Progress(log, f"checking images of {raw.root}", len(chunk), "images")
    for k, i in enumerate(chunk.tolist()):
        if k & 1023 == 0:
            progress.update(k)
        try:
            if known[k]:
                if os.stat(paths[i]).st_size == 0:
                    raise _Broken("is empty (0 bytes)")
                claimed = "its annotations give"
            else:
                sizes[k] = image_size(paths[i])
                claimed = "its header claims"
            width, height = int(sizes[k][0]), int(sizes[k][1])
            if width * height > MAX_IMAGE_PIXELS:
                raise _Broken(f"is too large to decode: {claimed} {width}x{height} = {width * height} pixels, over "
                              f"the limit of {MAX_IMAGE_PIXELS} (Pillow's decompression-bomb limit)")
        except _Broken as exc:
            problems[k] = f"{paths[i]} {exc} (named in {_where(raw, raw.image_where[i])})"
        except FileNotFoundError:
            problems[k] = f"{paths[i]} is missing (named in {_where(raw, raw.image_where[i])})"
        except OSError as exc:
            problems[k] = (f"{paths[i]} cannot be read: {exc.strerror or exc} "
                           f"(named in {_where(raw, raw.image_where[i])})")
    return sizes, problems


def _check_boxes(raw: RawIndex, positions: np.ndarray, sizes: np.ndarray) -> dict[int, str]:
    """{k: problem} for the images positions[k] with a box that is non-finite, empty or outside the image."""
    rows, counts = _box_rows(raw, positions)
    if len(rows) == 0:
        return {}
    b = raw.boxes_xywh[rows]
    width = np.repeat(sizes[:, 0], counts).astype(np.float64)
    height = np.repeat(sizes[:, 1], counts).astype(np.float64)
    x1, y1, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    x2, y2 = x1 + w, y1 + h
    with np.errstate(invalid="ignore"):
        nonfinite = ~np.isfinite(b).all(axis=1)
        empty = (w <= 0) | (h <= 0)
        tol = BOX_TOLERANCE_PX
        outside = (x1 < -tol) | (y1 < -tol) | (x2 > width + tol) | (y2 > height + tol)
        # inside the tolerance but only in the margin: nothing left once clipped to the image
        flat = (np.minimum(x2, width) <= np.maximum(x1, 0)) | (np.minimum(y2, height) <= np.maximum(y1, 0))
    bad = nonfinite | empty | outside | flat
    if not bad.any():
        return {}
    image_of_row = np.repeat(np.arange(len(positions)), counts)
    problems: dict[int, str] = {}
    for j in np.flatnonzero(bad).tolist():
        k = int(image_of_row[j])
        if k in problems:
            continue
        i, row = int(positions[k]), int(rows[j])
        box = f"box x={x1[j]:g} y={y1[j]:g} width={w[j]:g} height={h[j]:g}"
        if nonfinite[j]:
            why = f"{box} is not finite"
        elif empty[j]:
            why = f"{box} has zero or negative area"
        elif outside[j]:
            why = (f"{box} (x2={x2[j]:g}, y2={y2[j]:g}) lies outside the {int(width[j])}x{int(height[j])} image "
                   f"by more than {tol:g} px")
        else:
            why = f"{box} lies only in the {tol:g} px margin outside the {int(width[j])}x{int(height[j])} image"
        problems[k] = f"{_where(raw, raw.box_where[i].format(raw.box_refs[row]))}: {why}"
    return problems


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels.

    PNG and JPEG headers are parsed here (a few microseconds: one open and one read; PIL.Image.open
    takes ~200 us, which is seconds over a 20k-image dataset); other formats go through PIL, which
    also reads only the header. Missing file -> FileNotFoundError; empty or unreadable -> _Broken.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, 4096)
        if not head:
            raise _Broken("is empty (0 bytes)")
        size = None
        if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
            size = struct.unpack(">II", head[16:24])
        elif head[:2] == b"\xff\xd8":
            size = _jpeg_size(fd, head)
    finally:
        os.close(fd)
    if size is None:  # another format, or a JPEG we could not walk: let PIL read the header
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                size = image.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise _Broken(f"is not a readable image ({exc})") from exc
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise _Broken(f"has a header with size {width}x{height}")
    return width, height


# JPEG start-of-frame markers (baseline, progressive, lossless, ...): not DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(fd: int, head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, walking segment lengths from byte 2."""
    def read(pos: int, n: int) -> bytes:
        return head[pos:pos + n] if pos + n <= len(head) else os.pread(fd, n, pos)

    pos = 2
    for _ in range(1000):  # a JPEG has a few dozen segments before its frame at most
        marker = read(pos, 4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        if marker[1] == 0xFF:  # fill byte
            pos += 1
            continue
        if marker[1] == 0x01 or 0xD0 <= marker[1] <= 0xD7:  # markers without a length field
            pos += 2
            continue
        if marker[1] in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker[1] in _JPEG_SOF:
            frame = read(pos + 5, 4)
            if len(frame) < 4:
                return None
            height, width = struct.unpack(">HH", frame)
            return width, height
        pos += 2 + (marker[2] << 8 | marker[3])
    return None


class _Broken(Exception):
    """An image file that exists but cannot be used; the message completes "<path> ..."."""


def _where(raw: RawIndex, where: str) -> str:
    return os.path.join(raw.root, where)


def _short(values: list, limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
