"""Unity Perception SOLO datasets: sequence.N/stepM.frame_data.json beside the images.

Each frame file holds `captures[]`; a camera capture names its image (`filename`, relative to the
sequence folder; names may contain spaces) and its `dimension` [width, height], and carries
`annotations[]`. The 2D boxes are the annotation whose `@type` ends in `BoundingBox2DAnnotation`, values
`{instanceId, labelId, labelName, origin [x, y], dimension [w, h]}` in pixels, origin top-left. Label
names come from that annotation's definition in `annotation_definitions.json`
(`annotationDefinitions[]`, `spec[]` of `{label_id, label_name}`).

Each frame also carries `metrics[]` (`{@type, id, sensorId, annotationId, description, value | values}`),
defined in `metric_definitions.json` (`metricDefinitions[]`); `read_solo_metrics` reads them into the
companion table of `synthval.data.simulator`, in a pass of its own.
"""

from __future__ import annotations

import logging
import os
import re
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
from synthval.data.readers.perception import label_names_of
from synthval.data.simulator import SimulatorMetrics, SimulatorMetricsBuilder
from synthval.errors import DatasetError

log = logging.getLogger(__name__)
BBOX_TYPE_SUFFIX = "BoundingBox2DAnnotation"
DEFINITIONS_FILE = "annotation_definitions.json"
METRIC_DEFINITIONS_FILE = "metric_definitions.json"
_SEQUENCE = re.compile(r"sequence\.\d+$")
_FRAME = re.compile(r"step\d+\.frame_data\.json$")


def find_sequences(root: str) -> list[str]:
    """The sequence.N folders of `root` in numeric order (empty if none)."""
    try:
        names = [e.name for e in os.scandir(root) if e.is_dir() and _SEQUENCE.match(e.name)]
    except OSError:
        return []
    return [os.path.join(root, n) for n in sorted(names, key=natural_key)]


def _pick_definition(definitions: list[dict], requested: str | None, where: str) -> dict:
    boxes = [d for d in definitions if str(d.get("@type", "")).endswith(BBOX_TYPE_SUFFIX)]
    listing = ", ".join(f"{d.get('id')!s} ({d.get('@type', '?')})" for d in definitions) or "none"
    if requested is not None:
        for d in definitions:
            if str(d.get("id")) == str(requested):
                if d not in boxes:
                    raise DatasetError(f"{where}: definition {requested!r} is a {d.get('@type')}, not a 2D box "
                                       f"annotation; the 2D box definitions there are: "
                                       f"{', '.join(str(b.get('id')) for b in boxes) or 'none'}")
                return d
        raise DatasetError(f"{where}: no annotation definition with id {requested!r}; the definitions there "
                           f"are: {listing}")
    if len(boxes) == 1:
        return boxes[0]
    raise DatasetError(f"{where}: {len(boxes)} definitions of @type ...{BBOX_TYPE_SUFFIX}; choose one with "
                       f"bbox_definition_id. The definitions there are: {listing}")


def bbox_definition(root: str, requested: str | None) -> tuple[str, dict]:
    """(path of annotation_definitions.json, the 2D-box definition picked there)."""
    definitions_path = os.path.join(root, DEFINITIONS_FILE)
    doc = read_json_file(definitions_path)
    definitions = doc.get("annotationDefinitions") if isinstance(doc, dict) else None
    if not isinstance(definitions, list):
        raise DatasetError(f"{definitions_path}: expected an object with an 'annotationDefinitions' list")
    return definitions_path, _pick_definition(definitions, requested, definitions_path)


def frame_files(root: str) -> list[str]:
    """Every sequence.N/stepM.frame_data.json of `root`, sequences and steps in numeric order."""
    sequences = find_sequences(root)
    if not sequences:
        raise DatasetError(f"{root}: no sequence.N folders; not a SOLO dataset")
    files = []
    for sequence in sequences:
        frames = sorted((e.name for e in os.scandir(sequence) if _FRAME.match(e.name)), key=natural_key)
        files += [os.path.join(sequence, frame) for frame in frames]
    return files


def is_image_capture(capture: dict) -> bool:
    """A capture whose file is an image; no `filename` -> KeyError."""
    return capture["filename"].lower().endswith(IMAGE_EXTENSIONS)


def read_solo(root: str, bbox_definition_id: str | None = None) -> RawIndex:
    """Read every camera capture of a SOLO dataset at local folder `root` into a RawIndex."""
    files = frame_files(root)
    definitions_path, definition = bbox_definition(root, bbox_definition_id)
    label_names = label_names_of(definition, definitions_path)
    def_id = definition.get("id")

    builder = RawIndexBuilder()
    progress = Progress(log, f"reading {root}", len(files), "frames")
    for k, path in enumerate(files):
        if k & 255 == 0:
            progress.update(k)
        _read_frame(builder, read_json_file(path), os.path.relpath(path, root), os.path.dirname(path), def_id)
    return builder.build(os.path.abspath(root), "solo", label_names,
                         coord_names=("origin[0]", "origin[1]", "dimension[0]", "dimension[1]"),
                         label_field="labelId")


def _read_frame(builder: RawIndexBuilder, doc: Any, rel: str, folder: str, def_id: Any) -> None:
    ci = ai = vi = -1
    value: Any = doc
    try:
        for ci, capture in enumerate(doc["captures"]):
            ai = vi = -1
            value = capture
            if not is_image_capture(capture):
                continue
            filename = capture["filename"]
            width, height = capture["dimension"][:2]
            if width != int(width) or height != int(height) or width <= 0 or height <= 0:
                raise ValueError("dimension must be two positive whole numbers")
            builder.add_image(os.path.abspath(os.path.join(folder, filename)), int(width), int(height),
                              f"{rel}: captures[{ci}] (filename {filename!r})",
                              f"{rel}: captures[{ci}] (image {filename!r})")
            seen = 0
            for ai, annotation in enumerate(capture.get("annotations") or ()):
                value = annotation
                if not str(annotation.get("@type", "")).endswith(BBOX_TYPE_SUFFIX) or annotation.get("id") != def_id:
                    continue
                vi = -1
                seen += 1
                if seen == 1:
                    builder.box_where[-1] = f"{rel}: captures[{ci}].annotations[{ai}].values[{{}}] (image {filename!r})"
                else:
                    raise ValueError(f"a second {BBOX_TYPE_SUFFIX} with id {def_id!r} on one capture")
                for vi, value in enumerate(annotation.get("values") or ()):
                    (x, y), (w, h) = value["origin"][:2], value["dimension"][:2]
                    builder.add_box(x, y, w, h, value["labelId"], vi)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        where = f"{rel}: captures[{ci}]" if ci >= 0 else rel
        if ai >= 0:
            where += f".annotations[{ai}]"
        if vi >= 0:
            where += f".values[{vi}]"
        raise field_error(where, exc, value) from exc


# --- the simulator's metrics (a pass of its own: `synthval stats` asks for it, indexing never does) ---


def read_solo_metrics(root: str, bbox_definition_id: str | None = None) -> SimulatorMetrics:
    """The metrics of the SOLO dataset at local folder `root`, attached to its image captures.

    A metric with a `sensorId` describes that sensor's capture in the frame; one without (scenario
    iteration, random seed, a randomizer's values) describes every image capture of the frame.
    """
    files = frame_files(root)
    _, definition = bbox_definition(root, bbox_definition_id)
    def_id = definition.get("id")
    builder = SimulatorMetricsBuilder(os.path.abspath(root), "solo")
    definitions_path = os.path.join(root, METRIC_DEFINITIONS_FILE)
    if os.path.isfile(definitions_path):  # without it, metrics are named by id (a note of the statistics)
        _read_metric_definitions(builder, definitions_path)
    builder.files = files
    for path in files:
        _read_frame_metrics(builder, read_json_file(path), path, def_id)
    if not any(d.records for d in builder.definitions):
        builder.notes.append(f"{root}: no frame holds metrics; the simulator recorded none")
    return builder.build()


def _read_frame_metrics(builder: SimulatorMetricsBuilder, doc: Any, path: str, def_id: Any) -> None:
    folder = os.path.dirname(path)
    rows: list[int] = []
    by_sensor: dict[str, list[int]] = {}
    ci = -1
    try:
        for ci, capture in enumerate(doc["captures"]):
            if not is_image_capture(capture):
                continue
            boxes = [a for a in capture.get("annotations") or ()
                     if str(a.get("@type", "")).endswith(BBOX_TYPE_SUFFIX) and a.get("id") == def_id]
            instances = [value.get("instanceId") for annotation in boxes for value in annotation.get("values") or ()]
            row = builder.add_image(os.path.abspath(os.path.join(folder, capture["filename"])),
                                    f"{os.path.relpath(path, builder.root)}#{capture.get('id')}", instances)
            rows.append(row)
            by_sensor.setdefault(str(capture.get("id")), []).append(row)
        metrics = doc.get("metrics") or []
    except (KeyError, TypeError, AttributeError) as exc:
        raise field_error(f"{path}: captures[{ci}]" if ci >= 0 else path, exc, doc) from exc
    if not isinstance(metrics, list):
        raise DatasetError(f"{path}: field 'metrics' must be a list, got {type(metrics).__name__}")
    for k, metric in enumerate(metrics):
        where = f"{path}: metrics[{k}]"
        if not isinstance(metric, dict) or "id" not in metric:
            raise DatasetError(f"{where}: missing field 'id'")
        if "values" in metric:
            values = metric["values"]
            if isinstance(values, list) and len(values) > 1 and not any(isinstance(v, dict) for v in values):
                values = [values]  # a GenericMetric of a float[] (a Vector3: [x, y, z]) is one value
        elif "value" in metric:
            values = [metric["value"]]
        else:
            raise DatasetError(f"{where}: missing field 'values' (or 'value')")
        sensor = metric.get("sensorId") or ""
        builder.add_record(metric["id"], by_sensor.get(str(sensor), []) if sensor else rows, values, where)


def _read_metric_definitions(builder: SimulatorMetricsBuilder, path: str) -> None:
    doc = read_json_file(path)
    definitions = doc.get("metricDefinitions") if isinstance(doc, dict) else None
    if not isinstance(definitions, list):
        raise DatasetError(f"{path}: expected an object with a 'metricDefinitions' list")
    for k, definition in enumerate(definitions):
        if not isinstance(definition, dict) or "id" not in definition:
            raise DatasetError(f"{path}: metricDefinitions[{k}]: missing field 'id'")
        builder.add_definition(definition["id"], definition["id"], definition.get("description"),
                               definition.get("@type"), definition.get("spec"))
