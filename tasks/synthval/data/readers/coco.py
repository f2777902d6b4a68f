"""COCO detection annotations: one JSON with images[], annotations[] (bbox [x, y, w, h]) and categories[].

The dataset is either the JSON file itself or a folder with `annotations/*.json` beside `images/` (the
layout Unity's Perception-to-COCO converter writes). With several JSON files in `annotations/` the one
named `instances*.json` is read if it is the only such; otherwise point the URI at the file to use.
Image files are looked up under `images/` next to `annotations/`, else next to the JSON file.
Every annotation is kept with what COCO scoring needs: its `area` (the box area where absent),
`iscrowd` (a region of many objects: not trained on; in scoring it absorbs detections as pycocotools
does) and its `ignore` flag. Images keep their own `images[].id` (`RawIndex.image_ids`); index ids
are positions in `images[]`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from synthval.data.index import RawIndex, RawIndexBuilder, field_error, read_json_file
from synthval.data.labels import add_label
from synthval.errors import DatasetError


def annotation_files(root: str) -> list[str]:
    """The annotations/*.json files of a COCO folder that also has images/ (empty if not that layout)."""
    if not os.path.isdir(os.path.join(root, "images")):
        return []
    return sorted(glob.glob(os.path.join(glob.escape(root), "annotations", "*.json")))


def resolve_annotation_file(uri_path: str) -> str:
    """The one COCO JSON file to read for a path that is that file or a COCO folder."""
    if os.path.isfile(uri_path):
        return uri_path
    files = annotation_files(uri_path)
    if len(files) == 1:
        return files[0]
    instances = [f for f in files if os.path.basename(f).startswith("instances")]
    if len(instances) == 1:
        return instances[0]
    if not files:
        raise DatasetError(f"{uri_path}: no annotations/*.json beside an images/ folder; not a COCO dataset")
    names = ", ".join(os.path.basename(f) for f in files)
    raise DatasetError(f"{uri_path}: several COCO annotation files ({names}); point the dataset URI at the "
                       "one to read, e.g. .../annotations/<name>.json")


def read_coco(uri_path: str) -> RawIndex:
    """Read a COCO detection JSON (or the one in a COCO folder) into a RawIndex."""
    path = os.path.abspath(resolve_annotation_file(uri_path))
    doc = read_json_file(path)
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{path}: missing field {key!r} (a list); not a COCO detection file")
    folder = os.path.dirname(path)
    root = os.path.dirname(folder) if os.path.basename(folder) == "annotations" else folder
    rel = os.path.relpath(path, root)

    label_names: dict[int, str] = {}
    for k, category in enumerate(doc["categories"]):
        try:
            label_id, name = int(category["id"]), category["name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise field_error(f"{path}: categories[{k}]", exc, category) from exc
        add_label(label_names, label_id, name, f"{path}: categories[{k}]")

    images = doc["images"]
    position: dict[Any, int] = {}
    for k, image in enumerate(images):
        try:
            image_id = image["id"]
            if image_id in position:
                raise DatasetError(f"{path}: images[{k}] repeats image id {image_id!r} of "
                                   f"images[{position[image_id]}]")
            position[image_id] = k
        except (KeyError, TypeError) as exc:
            raise field_error(f"{path}: images[{k}]", exc, image) from exc
    per_image: list[list[int]] = [[] for _ in images]
    for k, annotation in enumerate(doc["annotations"]):
        try:
            k_image = position.get(annotation["image_id"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise field_error(f"{path}: annotations[{k}]", exc, annotation) from exc
        if k_image is None:
            raise DatasetError(f"{path}: annotations[{k}]: image_id {annotation['image_id']!r} is not in images[]")
        per_image[k_image].append(k)

    base = _image_base(root, folder, images)
    builder = RawIndexBuilder()
    annotations = doc["annotations"]
    k = a = -1
    value: Any = None
    try:
        for k, image in enumerate(images):
            a = -1
            value = image
            file_name = image["file_name"]
            width, height = image.get("width") or 0, image.get("height") or 0
            if width != int(width) or height != int(height) or width < 0 or height < 0:
                raise ValueError("width and height must be whole numbers")
            builder.add_image(os.path.join(base, file_name), int(width), int(height),
                              f"{rel}: images[{k}] (file_name {file_name!r})",
                              f"{rel}: annotations[{{}}] (image {file_name!r})")
            for a in per_image[k]:
                value = annotations[a]
                x, y, w, h = value["bbox"]
                builder.add_box(x, y, w, h, value["category_id"], a, value.get("area"), value.get("iscrowd", 0),
                                value.get("ignore", 0))
    except (KeyError, TypeError, ValueError) as exc:
        where = f"{path}: annotations[{a}]" if a >= 0 else f"{path}: images[{k}]"
        raise field_error(where, exc, value) from exc
    raw = builder.build(root, "coco", label_names, coord_names=("bbox[0]", "bbox[1]", "bbox[2]", "bbox[3]"),
                        label_field="category_id")
    raw.image_ids = list(position)
    return raw


def _image_base(root: str, folder: str, images: list) -> str:
    candidates = [os.path.join(root, "images"), root, folder]
    for image in images[:20]:
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if isinstance(file_name, str):
            for base in candidates:
                if os.path.isfile(os.path.join(base, file_name)):
                    return base
    return candidates[0] if os.path.isdir(candidates[0]) else folder
