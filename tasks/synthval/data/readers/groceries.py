"""UnityGroceries-Real (v3): the real images SynthDet is evaluated on.

Layout, as datasetinsights' GroceriesReal reads it:

    annotations.json              [{"file_name": "IMG_4185.JPG",
                                    "annotations": [{"label_id": 11, "bbox": [x, y, w, h]}, ...]}, ...]
    annotation_definitions.json   {"annotation_definitions": [{"spec": [{"label_id": 1, "label_name": ...}, ...]}]}
    groceries_real_<split>.txt    0-based indices into annotations.json (train, val, test, train_small, ...)
    images/<file_name>

The annotations carry no image sizes, so the loader reads them from the JPEG headers. EXIF orientation
is not applied, here or when pixels are decoded, matching the seed reader (boxes refer to the stored
pixel grid).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from synthval.data.index import RawIndex, RawIndexBuilder, field_error, read_json_file
from synthval.data.readers.perception import label_names_of, pick_bbox_definition, read_definitions
from synthval.errors import DatasetError

ANNOTATIONS_FILE = "annotations.json"
DEFINITIONS_FILE = "annotation_definitions.json"
SPLIT_PREFIX = "groceries_real_"


def split_files(root: str) -> dict[str, str]:
    """{split name: path} of the groceries_real_<split>.txt files in `root`."""
    found = glob.glob(os.path.join(glob.escape(root), SPLIT_PREFIX + "*.txt"))
    return {os.path.basename(p)[len(SPLIT_PREFIX):-len(".txt")]: p for p in sorted(found)}


def looks_like_groceries(root: str) -> bool:
    return (os.path.isfile(os.path.join(root, ANNOTATIONS_FILE))
            and os.path.isfile(os.path.join(root, DEFINITIONS_FILE)) and bool(split_files(root)))


def read_groceries(root: str, bbox_definition_id: str | None = None) -> RawIndex:
    """Read a GroceriesReal folder into a RawIndex whose `split_files` are its groceries_real_*.txt."""
    definitions_path = os.path.join(root, DEFINITIONS_FILE)
    definitions = read_definitions(definitions_path)
    if bbox_definition_id is None and len(definitions) == 1:
        definition = definitions[0]
    else:
        definition = pick_bbox_definition(definitions, bbox_definition_id, None, definitions_path)
    label_names = label_names_of(definition, definitions_path)

    path = os.path.join(root, ANNOTATIONS_FILE)
    doc = read_json_file(path)
    if not isinstance(doc, list):
        raise DatasetError(f"{path}: expected a list of {{file_name, annotations}} records")
    images_dir = os.path.abspath(os.path.join(root, "images"))
    builder = RawIndexBuilder()
    i = j = -1
    value: Any = None
    try:
        for i, record in enumerate(doc):
            j = -1
            value = record
            file_name = record["file_name"]
            builder.add_image(os.path.join(images_dir, file_name), 0, 0,
                              f"{ANNOTATIONS_FILE}: [{i}] (file_name {file_name!r})",
                              f"{ANNOTATIONS_FILE}: [{i}].annotations[{{}}] (image {file_name!r})")
            for j, value in enumerate(record["annotations"] or ()):
                x, y, w, h = value["bbox"]
                builder.add_box(x, y, w, h, value["label_id"], j)
    except (KeyError, TypeError, ValueError) as exc:
        where = f"{path}: [{i}]" + (f".annotations[{j}]" if j >= 0 else "")
        raise field_error(where, exc, value) from exc
    raw = builder.build(os.path.abspath(root), "groceries", label_names,
                        coord_names=("bbox[0]", "bbox[1]", "bbox[2]", "bbox[3]"))
    raw.split_files = split_files(root)
    return raw
