"""Unity Perception 0.0.1 datasets: captures_*.json + annotation_definitions.json, 2D boxes in pixels.

Layout (as Unity writes it): `<root>/Dataset/captures_000.json ...` and the images beside `Dataset/`
(`<root>/RGB<guid>/rgb_2.png`), each capture's `filename` relative to `<root>`. Also accepted: the
captures files in `<root>` itself. A 2D box value is `{label_id, label_name, instance_id, x, y, width,
height}`, origin top-left, in pixels. Only camera captures are images (a LIDAR capture is skipped).

`read_perception_metrics` reads the simulator's metrics (`metric_definitions.json`, `metrics_*.json`)
into the companion table of `synthval.data.simulator`, in a pass of its own.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from synthval.data.index import (
    IMAGE_EXTENSIONS,
    Progress,
    RawIndex,
    RawIndexBuilder,
    field_error,
    natural_key,
    read_json_file,
)
from synthval.data.labels import add_label
from synthval.data.simulator import SimulatorMetrics, SimulatorMetricsBuilder
from synthval.errors import DatasetError

log = logging.getLogger(__name__)

# The 2D bounding-box annotation definition id that SynthDet's Perception setup writes.
SYNTHDET_BBOX_DEFINITION_ID = "c31620e3-55ff-4af6-ae86-884aa0daa9b2"
DEFINITIONS_FILE = "annotation_definitions.json"
METRIC_DEFINITIONS_FILE = "metric_definitions.json"


def find_captures(root: str) -> tuple[str, list[str]]:
    """Return (folder holding the captures files, captures_*.json paths in natural order); none -> ([])."""
    for folder in (os.path.join(root, "Dataset"), root):
        files = glob.glob(os.path.join(glob.escape(folder), "captures_*.json"))
        if files:
            return folder, sorted(files, key=lambda p: natural_key(os.path.basename(p)))
    return root, []


def is_bbox_2d_definition(definition: dict) -> bool:
    """True for a Perception-style 2D bounding-box definition ("bounding box", "2d bounding box", ...)."""
    name = str(definition.get("name", "")).lower()
    return "bounding box" in name and "3d" not in name and str(definition.get("format", "JSON")).upper() == "JSON"


def pick_bbox_definition(definitions: list[dict], requested: str | None, default: str | None, where: str) -> dict:
    """Pick the 2D-box annotation definition by id.

    `requested` (the user's choice) must exist. With no request, `default` is used if present; otherwise
    the one definition that looks like a 2D bounding box is used with a warning naming it. Anything else
    raises DatasetError listing the definitions there are.
    """
    by_id = {str(d.get("id")).lower(): d for d in definitions}
    listing = ", ".join(f"{d.get('id')!s} ({d.get('name', '?')})" for d in definitions) or "none"
    if requested is not None:
        found = by_id.get(str(requested).lower())
        if found is None:
            raise DatasetError(f"{where}: no annotation definition with id {requested!r}; "
                               f"the definitions there are: {listing}")
        return found
    if default is not None and str(default).lower() in by_id:
        return by_id[str(default).lower()]
    boxes = [d for d in definitions if is_bbox_2d_definition(d)]
    if len(boxes) == 1:
        # Perception versions and setups give the 2D labeler different ids; one unambiguous candidate is
        # what the user means, but say so, so a wrong pick is visible in the log.
        if default is not None:
            log.warning("%s: the default 2D bounding-box definition %s is absent; using the only 2D "
                        "bounding-box definition, id %s (%s). Definitions there: %s. Pass "
                        "bbox_definition_id to choose another.", where, default, boxes[0].get("id"),
                        boxes[0].get("name"), listing)
        return boxes[0]
    wanted = f"the default id {default!r} is absent and " if default is not None else ""
    raise DatasetError(f"{where}: {wanted}{len(boxes)} definitions look like 2D bounding boxes; choose one "
                       f"with bbox_definition_id. The definitions there are: {listing}")


def label_names_of(definition: dict, where: str) -> dict[int, str]:
    """The {label_id: label_name} map of a definition's `spec`."""
    spec = definition.get("spec")
    if not isinstance(spec, list) or not spec:
        raise DatasetError(f"{where}: definition {definition.get('id')!s} has no 'spec' list of labels")
    names: dict[int, str] = {}
    for k, item in enumerate(spec):
        try:
            label_id, name = item["label_id"], item["label_name"]
            if not isinstance(label_id, int) or isinstance(label_id, bool):
                raise TypeError("label_id must be an integer")
        except (KeyError, TypeError) as exc:
            raise field_error(f"{where}: definition {definition.get('id')!s} spec[{k}]", exc, item) from exc
        add_label(names, label_id, name, f"{where}: definition {definition.get('id')!s} spec[{k}]")
    return names


def read_definitions(path: str) -> list[dict]:
    doc = read_json_file(path)
    definitions = doc.get("annotation_definitions") if isinstance(doc, dict) else None
    if not isinstance(definitions, list):
        raise DatasetError(f"{path}: expected an object with an 'annotation_definitions' list")
    return definitions


def bbox_definition(dataset_dir: str, requested: str | None) -> tuple[str, dict]:
    """(path of annotation_definitions.json, the 2D-box definition picked there by `pick_bbox_definition`)."""
    definitions_path = os.path.join(dataset_dir, DEFINITIONS_FILE)
    if not os.path.isfile(definitions_path):
        raise DatasetError(f"{definitions_path}: missing; a Perception dataset needs it for the label names")
    return definitions_path, pick_bbox_definition(read_definitions(definitions_path), requested,
                                                  SYNTHDET_BBOX_DEFINITION_ID, definitions_path)


def is_image_capture(capture: dict) -> bool:
    """A camera capture (by its sensor's modality, else by its file's extension); no `filename` -> KeyError."""
    filename = capture["filename"]
    modality = (capture.get("sensor") or {}).get("modality")
    if modality is not None:
        return modality == "camera"
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def read_perception(root: str, bbox_definition_id: str | None = None) -> RawIndex:
    """Read every camera capture of a Perception 0.0.1 dataset at local folder `root` into a RawIndex."""
    dataset_dir, files = find_captures(root)
    if not files:
        raise DatasetError(f"{root}: no captures_*.json in the folder or in its Dataset/ subfolder")
    definitions_path, definition = bbox_definition(dataset_dir, bbox_definition_id)
    label_names = label_names_of(definition, definitions_path)
    def_id = str(definition.get("id")).lower()

    builder = RawIndexBuilder()
    base: str | None = None
    progress = Progress(log, f"reading {root}", len(files), "captures files")
    for k, path in enumerate(files):
        progress.update(k)
        rel = os.path.relpath(path, root)
        captures = _captures_in(path)
        if base is None:
            base = _image_base(root, dataset_dir, captures)
        _read_captures(builder, captures, rel, base, def_id)
    return builder.build(os.path.abspath(root), "perception", label_names)


def _captures_in(path: str) -> list:
    """The `captures` list of one captures_*.json; DatasetError naming the file when it has none."""
    doc = read_json_file(path)
    captures = doc.get("captures") if isinstance(doc, dict) else None
    if not isinstance(captures, list):
        raise DatasetError(f"{path}: expected an object with a 'captures' list")
    return captures


def _read_captures(builder: RawIndexBuilder, captures: list, rel: str, base: str, def_id: str) -> None:
    # The hot loop of the reader (one pass over ~100k box dicts for a SynthDet-sized dataset): plain
    # list appends into the builder, no per-box objects; positions kept in locals for error messages.
    paths, sizes, offsets = builder.paths, builder.sizes, builder.offsets
    coords, labels, refs = builder.coords, builder.labels, builder.refs
    image_where, box_where = builder.image_where, builder.box_where
    join = os.path.join
    ci = ai = vi = -1
    value: Any = None
    try:
        for ci, capture in enumerate(captures):
            ai = vi = -1
            value = capture
            if not is_image_capture(capture):
                continue
            filename = capture["filename"]
            n = offsets[-1]
            paths.append(join(base, filename))
            sizes += (0, 0)
            image_where.append(f"{rel}: captures[{ci}] (filename {filename!r})")
            box_where.append(f"{rel}: captures[{ci}] (image {filename!r})")
            first, seen = n, 0
            for ai, annotation in enumerate(capture.get("annotations") or ()):
                value = annotation
                if str(annotation.get("annotation_definition")).lower() != def_id:
                    continue
                vi = -1
                seen += 1
                if seen == 1:
                    box_where[-1] = f"{rel}: captures[{ci}].annotations[{ai}].values[{{}}] (image {filename!r})"
                    for vi, value in enumerate(annotation.get("values") or ()):
                        coords += (value["x"], value["y"], value["width"], value["height"])
                        labels.append(value["label_id"])
                        refs.append(vi)
                        n += 1
                else:  # a second 2D-box annotation on one capture (unusual): number boxes across the capture
                    box_where[-1] = f"{rel}: captures[{ci}], 2D box #{{}} of the capture (image {filename!r})"
                    refs[first:] = range(n - first)
                    for vi, value in enumerate(annotation.get("values") or ()):
                        coords += (value["x"], value["y"], value["width"], value["height"])
                        labels.append(value["label_id"])
                        refs.append(n - first)
                        n += 1
            offsets.append(n)
    except (KeyError, TypeError, AttributeError) as exc:
        where = f"{rel}: captures[{ci}]"
        if ai >= 0:
            where += f".annotations[{ai}]"
        if vi >= 0:
            where += f".values[{vi}]"
        raise field_error(where, exc, value) from exc


def _image_base(root: str, dataset_dir: str, captures: list) -> str:
    # Unity writes filenames relative to the folder that holds Dataset/; if the user pointed at
    # Dataset/ itself, the images are one level up. Probe the first capture to tell.
    candidates = [root]
    if os.path.abspath(dataset_dir) == os.path.abspath(root):
        candidates.append(os.path.dirname(os.path.abspath(root)))
    else:
        candidates.append(dataset_dir)
    for capture in captures[:20]:
        filename = capture.get("filename") if isinstance(capture, dict) else None
        if isinstance(filename, str):
            for base in candidates:
                if os.path.exists(os.path.join(base, filename)):
                    return os.path.abspath(base)
    return os.path.abspath(root)


# --- the simulator's metrics (a pass of its own: `synthval stats` asks for it, indexing never does) ---


def read_perception_metrics(root: str, bbox_definition_id: str | None = None) -> SimulatorMetrics:
    """The metrics of the Perception 0.0.1 dataset at local folder `root`, attached to its image captures.

    Streams captures_*.json (each capture's id, sequence and step; for image captures the path the
    index gives them and their 2D boxes' instance ids, of the same definition the reader picks), then
    metric_definitions.json and metrics_*.json. No metrics is a note in the result; a malformed metrics
    file raises DatasetError naming the file and field.
    """
    dataset_dir, files = find_captures(root)
    if not files:
        raise DatasetError(f"{root}: no captures_*.json in the folder or in its Dataset/ subfolder")
    _, definition = bbox_definition(dataset_dir, bbox_definition_id)
    def_id = str(definition.get("id")).lower()
    builder = SimulatorMetricsBuilder(os.path.abspath(root), "perception")
    by_capture: dict[str, int] = {}
    by_step: dict[tuple[str, Any], list[int]] = {}
    by_sequence: dict[str, list[int]] = {}
    base: str | None = None
    for path in files:
        captures = _captures_in(path)
        if base is None:
            base = _image_base(root, dataset_dir, captures)
        for ci, capture in enumerate(captures):
            try:
                row = -1
                if is_image_capture(capture):
                    instances = [value.get("instance_id") for annotation in capture.get("annotations") or ()
                                 if str(annotation.get("annotation_definition")).lower() == def_id
                                 for value in annotation.get("values") or ()]
                    row = builder.add_image(os.path.join(base, capture["filename"]), str(capture.get("id")),
                                            instances)
                key = (str(capture.get("sequence_id")), capture.get("step"))
            except (KeyError, TypeError, AttributeError) as exc:
                raise field_error(f"{path}: captures[{ci}]", exc, capture) from exc
            by_capture.setdefault(str(capture.get("id")), row)
            if row >= 0:
                by_step.setdefault(key, []).append(row)
                by_sequence.setdefault(key[0], []).append(row)

    metric_files = sorted(glob.glob(os.path.join(glob.escape(dataset_dir), "metrics_*.json")),
                          key=lambda p: natural_key(os.path.basename(p)))
    if not metric_files:
        builder.notes.append(f"{dataset_dir}: no metrics_*.json; the simulator recorded no metrics")
        return builder.build()
    definitions_path = os.path.join(dataset_dir, METRIC_DEFINITIONS_FILE)
    if os.path.isfile(definitions_path):  # without it, metrics are named by id (a note of the statistics)
        _read_metric_definitions(builder, definitions_path)
    for path in metric_files:
        builder.files.append(path)
        doc = read_json_file(path)
        metrics = doc.get("metrics") if isinstance(doc, dict) else None
        if not isinstance(metrics, list):
            raise DatasetError(f"{path}: expected an object with a 'metrics' list")
        for k, record in enumerate(metrics):
            where = f"{path}: metrics[{k}]"
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
            for name in ("metric_definition", "values"):
                if name not in record:
                    raise DatasetError(f"{where}: missing field {name!r}")
            builder.add_record(record["metric_definition"], _attached_rows(record, by_capture, by_step, by_sequence),
                               record["values"], where)
    return builder.build()


def _attached_rows(record: dict, by_capture: dict[str, int], by_step: dict[tuple[str, Any], list[int]],
                   by_sequence: dict[str, list[int]]) -> list[int]:
    """The image rows a metric record describes: its capture, else its step's images, else its sequence's."""
    capture_id = record.get("capture_id")
    if capture_id is not None:
        row = by_capture.get(str(capture_id), -1)
        return [row] if row >= 0 else []
    sequence = str(record.get("sequence_id"))
    step = record.get("step")
    if step is not None and (sequence, step) in by_step:
        return by_step[(sequence, step)]
    return by_sequence.get(sequence, [])


def _read_metric_definitions(builder: SimulatorMetricsBuilder, path: str) -> None:
    doc = read_json_file(path)
    definitions = doc.get("metric_definitions") if isinstance(doc, dict) else None
    if not isinstance(definitions, list):
        raise DatasetError(f"{path}: expected an object with a 'metric_definitions' list")
    for k, definition in enumerate(definitions):
        if not isinstance(definition, dict) or "id" not in definition:
            raise DatasetError(f"{path}: metric_definitions[{k}]: missing field 'id'")
        builder.add_definition(definition["id"], definition.get("name"), definition.get("description"),
                               spec=definition.get("spec"))
