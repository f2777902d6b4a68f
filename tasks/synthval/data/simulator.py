"""What the simulator measured beside the boxes: Unity Perception metrics, as a companion table to the index.

Perception records metrics beside the annotations (schema 0.0.1: `metric_definitions.json` and
`metrics_*.json`; SOLO: `metric_definitions.json` and each frame's `metrics`): ObjectCount (objects per
label), RenderedObjectInfo (each visible object's label, instance id and visible pixels), the scenario
iteration, the random seed, and whatever a randomizer reports (light rotation and colour, object
rotation and position, ...). The format readers (`perception.read_perception_metrics`,
`solo.read_solo_metrics`) stream them into one `SimulatorMetrics` in a pass of their own that
`synthval stats` asks for: indexing a dataset for training never reads a metric.

The table is keyed by image capture and instance. An image capture is named by the same absolute image
path the index holds (`ImageRecord.path`) and keeps its 2D boxes' instance ids in box order, so a box's
visible pixels are found by (image, instance id). A metric record is attached to image captures: a
record naming a capture to that capture; a frame-level record (Perception: no capture, a sequence and a
step; SOLO: an empty `sensorId`) to the image captures of its step, else of its sequence. A record
whose capture is not an image of the dataset (a LIDAR capture, an id no capture has) is still read and
checked, and counted as unattached.

Generic metrics are flattened to numeric fields: `{"color": {"r": .9}, "rotation": [10, 20, 0]}` gives
`color.r`, `rotation.x`, `rotation.y`, `rotation.z`; `label_id` / `instance_id` (or `labelId` /
`instanceId`) key the row instead of becoming fields. Strings and booleans are not measured.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.errors import DatasetError

OBJECT_COUNT = "object_count"
RENDERED_OBJECT_INFO = "rendered_object_info"
SCENARIO_ITERATION = "scenario_iteration"
RANDOM_SEED = "random_seed"
GENERIC = "generic"

# Definition ids Unity's labelers and scenarios register in Perception 0.x (schema 0.0.1), and SynthDet's.
_KNOWN_IDS = {
    "51da3c27-369d-4929-aea6-d01614635ce2": OBJECT_COUNT,
    "5ba92024-b3b7-41a7-9d3f-c03a6a8ddd01": RENDERED_OBJECT_INFO,
    "659c6e36-f9f8-4dd6-9651-4a80e51eabc4": RENDERED_OBJECT_INFO,
    "db1b258e-d1d0-41b6-8751-16f601a2e230": SCENARIO_ITERATION,
    "14adb394-46c0-47e8-a3f0-99e754483b76": RANDOM_SEED,
}
# Names (and SOLO ids), lower-cased with everything but letters and digits removed.
_KNOWN_NAMES = {
    "objectcount": OBJECT_COUNT, "renderedobjectinfo": RENDERED_OBJECT_INFO, "visiblepixel": RENDERED_OBJECT_INFO,
    "visiblepixels": RENDERED_OBJECT_INFO, "scenarioiteration": SCENARIO_ITERATION, "randomseed": RANDOM_SEED,
}
_KNOWN_TYPES = {"ObjectCountMetric": OBJECT_COUNT, "RenderedObjectInfoMetric": RENDERED_OBJECT_INFO}
_LABEL_KEYS = ("label_id", "labelId")
_INSTANCE_KEYS = ("instance_id", "instanceId")
_AXES = ("x", "y", "z", "w")
MAX_FIELDS = 64  # numeric fields kept per generic metric; more are counted, not kept
MAX_DEPTH = 4
_NUMBER = (int, float)
_HUGE = 1e15  # larger magnitudes are taken for corrupt values


def metric_kind(definition_id: Any, name: Any = None, type_name: Any = None) -> str:
    """The kind of a metric definition, from its id, name or SOLO @type; anything else is GENERIC."""
    type_tail = str(type_name or "").rsplit(".", 1)[-1]
    if type_tail in _KNOWN_TYPES:
        return _KNOWN_TYPES[type_tail]
    key = str(definition_id).lower()
    if key in _KNOWN_IDS:
        return _KNOWN_IDS[key]
    for text in (definition_id, name):
        kind = _KNOWN_NAMES.get("".join(c for c in str(text or "").lower() if c.isalnum()))
        if kind:
            return kind
    return GENERIC


@dataclass
class MetricDefinition:
    """One metric definition and what was read of it: records, values, and records attached to an image."""

    id: str
    name: str
    description: str
    kind: str
    label_names: dict[int, str] = field(default_factory=dict)  # from the definition's `spec`, if any
    defined: bool = True  # False: named by a record but absent from metric_definitions.json
    records: int = 0
    values: int = 0
    attached: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "defined": self.defined,
                "records": self.records, "values": self.values, "attached_records": self.attached}


@dataclass
class SimulatorMetrics:
    """Metrics of one dataset as flat columns (numpy arrays), keyed by image capture and instance.

    Image capture i: `image_paths[i]` (absolute, as in the index), `capture_keys[i]` (Perception's
    capture id; SOLO's frame file and sensor id), its 2D boxes' instance ids
    `box_instance_ids[box_offsets[i]:box_offsets[i + 1]]` and its scenario `iteration[i]` (-1: none).
    Tables (column -> array; `image` is -1 for a record attached to no image capture):
    `objects` (RenderedObjectInfo: image, definition, label_id, instance_id (-1: none), visible_pixels),
    `object_counts` (ObjectCount: image, definition, label_id, count), `values` (generic metrics:
    image, field, label_id, instance_id, value) with `fields[k]` = (definition id, field name).
    `definitions` index the `definition` columns.
    """

    root: str
    format: str
    definitions: list[MetricDefinition]
    image_paths: list[str]
    capture_keys: list[str]
    box_instance_ids: np.ndarray
    box_offsets: np.ndarray
    iteration: np.ndarray
    seeds: list[float]
    objects: dict[str, np.ndarray]
    object_counts: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    fields: list[tuple[str, str]]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def definitions_of(self, kind: str) -> list[MetricDefinition]:
        return [d for d in self.definitions if d.kind == kind]

    def image_rows(self, paths: list[str]) -> np.ndarray:
        """Row of each path in this table's image captures (-1 where the table has no such image)."""
        rows = {p: i for i, p in enumerate(self.image_paths)}
        return np.array([rows.get(p, -1) for p in paths], dtype=np.int64)

    def box_visible_pixels(self, rows: np.ndarray, box_counts: np.ndarray) -> np.ndarray:
        """Visible pixels (RenderedObjectInfo) of each box of the images at table `rows`, concatenated in
        box order; NaN for a box whose image, instance id or RenderedObjectInfo entry is unknown.

        `box_counts[k]` is the number of boxes the index holds for image k: an image whose table entry
        names another number of 2D boxes gets NaN for all of them rather than a shifted match.
        """
        objects = self.objects
        keyed = objects["instance_id"] >= 0
        lookup: dict[tuple[int, int], float] = {}
        for image, instance, pixels in zip(objects["image"][keyed].tolist(), objects["instance_id"][keyed].tolist(),
                                           objects["visible_pixels"][keyed].tolist()):
            lookup.setdefault((image, instance), pixels)
        out = np.full(int(np.sum(box_counts)), np.nan)
        at = 0
        offsets = self.box_offsets
        for row, count in zip(rows.tolist(), np.asarray(box_counts).tolist()):
            if row >= 0 and offsets[row + 1] - offsets[row] == count:
                instances = self.box_instance_ids[offsets[row]:offsets[row + 1]].tolist()
                out[at:at + count] = [lookup.get((row, i), math.nan) for i in instances]
            at += count
        return out


class SimulatorMetricsBuilder:
    """Collects image captures and metric records (checking every value) and packs them into SimulatorMetrics."""

    def __init__(self, root: str, format: str) -> None:
        self.root, self.format = root, format
        self.definitions: list[MetricDefinition] = []
        self._by_id: dict[str, int] = {}
        self.image_paths: list[str] = []
        self.capture_keys: list[str] = []
        self.box_instances = array("q")
        self.box_offsets = array("q", [0])
        self.iteration = array("q")
        self.seeds: list[float] = []
        self.objects = {k: array("q") for k in ("image", "definition", "label_id", "instance_id")}
        self.objects["visible_pixels"] = array("d")
        self.counts = {k: array("q") for k in ("image", "definition", "label_id")}
        self.counts["count"] = array("d")
        self.values = {k: array("q") for k in ("image", "field", "label_id", "instance_id")}
        self.values["value"] = array("d")
        self.fields: list[tuple[str, str]] = []
        self._field_codes: dict[tuple[int, str], int] = {}
        self._templates: dict[tuple, tuple | None] = {}
        self._dropped_fields: dict[int, set[str]] = {}
        self.files: list[str] = []
        self.notes: list[str] = []

    def add_definition(self, definition_id: Any, name: Any = None, description: Any = None,
                       type_name: Any = None, spec: Any = None) -> None:
        """Register a definition (a repeated id is ignored); `spec` may list {label_id, label_name}."""
        key = str(definition_id)
        if key in self._by_id:
            return
        labels = {item["label_id"]: str(item["label_name"]).strip() for item in spec or ()
                  if isinstance(item, dict) and isinstance(item.get("label_id"), int) and "label_name" in item} \
            if isinstance(spec, list) else {}
        self._by_id[key] = len(self.definitions)
        self.definitions.append(MetricDefinition(key, str(name or definition_id), str(description or ""),
                                                 metric_kind(definition_id, name, type_name), labels))

    def add_image(self, path: str, capture_key: str, instance_ids: list[Any]) -> int:
        """Add an image capture with its 2D boxes' instance ids (None where a box has none); return its row."""
        self.image_paths.append(path)
        self.capture_keys.append(capture_key)
        self.box_instances.extend(i if isinstance(i, int) and not isinstance(i, bool) else -1 for i in instance_ids)
        self.box_offsets.append(len(self.box_instances))
        self.iteration.append(-1)
        return len(self.image_paths) - 1

    def add_record(self, definition_id: Any, rows: list[int], values: Any, where: str) -> None:
        """Read one metric record's `values` (a list) for the image rows it is attached to ([]: none)."""
        key = str(definition_id)
        if key not in self._by_id:
            self.add_definition(key)
            self.definitions[-1].defined = False
        code = self._by_id[key]
        definition = self.definitions[code]
        definition.records += 1
        definition.attached += bool(rows)
        if not isinstance(values, list):
            raise DatasetError(f"{where}: 'values' must be a list, got {_short(values)}")
        definition.values += len(values)
        targets = rows or [-1]
        if definition.kind == OBJECT_COUNT:
            self._object_counts(code, targets, values, where)
        elif definition.kind == RENDERED_OBJECT_INFO:
            self._rendered_objects(code, targets, values, where)
        elif definition.kind in (SCENARIO_ITERATION, RANDOM_SEED):
            read = self._iteration if definition.kind == SCENARIO_ITERATION else self._seed
            for j, value in enumerate(values):
                read(targets, value, f"{where}.values[{j}]")
        else:
            for j, value in enumerate(values):
                self._generic(code, targets, value, where, j)

    # Each reader takes a fast path for well-formed values (bulk extraction and one type-and-range test
    # per value, ~20x faster on SynthDet-sized metrics) and falls back to checking value by value, which
    # names the first bad one, only when that test fails.

    def _object_counts(self, code: int, targets: list[int], values: list, where: str) -> None:
        try:
            label_key = _LABEL_KEYS[0] if _LABEL_KEYS[0] in values[0] else _LABEL_KEYS[1]
            labels = [v[label_key] for v in values]
            counts = [v["count"] for v in values]
            fast = all(type(x) is int for x in labels) and all(type(c) in _NUMBER and 0 <= c <= _HUGE for c in counts)
        except (KeyError, TypeError, IndexError):
            fast = False
        if not fast:
            labels, counts = [], []
            for j, value in enumerate(values):
                w = f"{where}.values[{j}]"
                labels.append(_integer(*_field(value, _LABEL_KEYS, w), w))
                counts.append(_number(*_field(value, ("count",), w), w, minimum=0))
        _extend(self.counts, targets, {"definition": code, "label_id": labels, "count": counts}, len(values))

    def _rendered_objects(self, code: int, targets: list[int], values: list, where: str) -> None:
        try:
            first = values[0]
            label_key = _LABEL_KEYS[0] if _LABEL_KEYS[0] in first else _LABEL_KEYS[1]
            pixel_key = "visible_pixels" if "visible_pixels" in first else "visiblePixels"
            instance_key = next((k for k in _INSTANCE_KEYS if k in first), None)
            labels = [v[label_key] for v in values]
            pixels = [v[pixel_key] for v in values]
            instances = [v[instance_key] for v in values] if instance_key else [-1] * len(values)
            fast = (all(type(x) is int for x in labels) and all(type(x) is int for x in instances)
                    and all(type(p) in _NUMBER and 0 <= p <= _HUGE for p in pixels)
                    and (instance_key is not None or not any(k in v for v in values for k in _INSTANCE_KEYS)))
        except (KeyError, TypeError, IndexError):
            fast = False
        if not fast:
            labels, instances, pixels = [], [], []
            for j, value in enumerate(values):
                w = f"{where}.values[{j}]"
                labels.append(_integer(*_field(value, _LABEL_KEYS, w), w))
                key, instance = _field(value, _INSTANCE_KEYS, w, required=False)
                instances.append(-1 if instance is None else _integer(key, instance, w))
                pixels.append(_number(*_field(value, ("visible_pixels", "visiblePixels"), w), w, minimum=0))
        _extend(self.objects, targets, {"definition": code, "label_id": labels, "instance_id": instances,
                                        "visible_pixels": pixels}, len(values))

    def _iteration(self, targets: list[int], value: Any, where: str) -> None:
        key = "value"
        if isinstance(value, dict):
            key, value = _field(value, ("iteration", "Iteration"), where)
        iteration = _integer(key, value, where)
        for row in targets:
            if row >= 0:
                self.iteration[row] = iteration

    def _seed(self, targets: list[int], value: Any, where: str) -> None:
        key = "value"
        if isinstance(value, dict):
            key, value = _field(value, ("seed", "random_seed", "randomSeed", "value"), where)
        seed = _number(key, value, where)
        if seed not in self.seeds:
            self.seeds.append(seed)

    def _generic(self, code: int, targets: list[int], value: Any, where: str, j: int) -> None:
        found = self._template_leaves(code, value)
        if found is None:
            found = self._checked_leaves(code, value, f"{where}.values[{j}]")
        label, instance, codes, numbers = found
        if codes:
            _extend(self.values, targets, {"field": codes, "label_id": label, "instance_id": instance,
                                           "value": numbers}, len(codes))

    def _checked_leaves(self, code: int, value: Any, where: str) -> tuple[int, int, list[int], list[float]]:
        """(label id, instance id, field codes, numbers) of one generic value, every leaf checked."""
        label = instance = -1
        if isinstance(value, dict):
            key, found = _field(value, _LABEL_KEYS, where, required=False)
            label = -1 if found is None else _integer(key, found, where)
            key, found = _field(value, _INSTANCE_KEYS, where, required=False)
            instance = -1 if found is None else _integer(key, found, where)
        leaves: list[tuple[str, float]] = []
        _flatten(value, "", leaves, where, 0)
        codes, numbers = [], []
        for name, number in leaves:
            field_code = self._field_code(code, name)
            if field_code >= 0:
                codes.append(field_code)
                numbers.append(number)
        return label, instance, codes, numbers

    def _template_leaves(self, code: int, value: Any) -> tuple[int, int, list[int], list[float]] | None:
        """The leaves of a flat value (numbers, and lists or objects of numbers, one level deep) by a template
        learnt from the first value of its shape; None where the value needs the checked path."""
        if type(value) is not dict:
            return None
        shape = tuple((k, type(v), tuple(v) if type(v) is dict else len(v) if type(v) is list else 0)
                      for k, v in value.items())
        template = self._templates.get((code, shape), False)
        if template is False:
            template = self._templates[(code, shape)] = self._learn_template(code, value)
        if template is None:
            return None
        label_key, instance_key, paths, codes = template
        try:
            numbers = [value[k] if sub is None else value[k][sub] for k, sub in paths]
        except (KeyError, IndexError, TypeError):
            return None
        label = value[label_key] if label_key else -1
        instance = value[instance_key] if instance_key else -1
        if type(label) is not int or type(instance) is not int or not all(
                type(x) in _NUMBER and -_HUGE <= x <= _HUGE for x in numbers):
            return None
        return label, instance, codes, numbers

    def _learn_template(self, code: int, value: dict) -> tuple | None:
        paths, names = [], []
        label_key = instance_key = None
        for key, item in value.items():
            if key in _LABEL_KEYS or key in _INSTANCE_KEYS:
                if key in _LABEL_KEYS:
                    label_key = key
                else:
                    instance_key = key
                continue
            if type(item) in _NUMBER:
                paths.append((key, None))
                names.append(str(key))
            elif type(item) is list and all(type(x) in _NUMBER for x in item):
                axes = 2 <= len(item) <= 4
                paths += [(key, i) for i in range(len(item))]
                names += [f"{key}.{_AXES[i]}" if axes else f"{key}[{i}]" for i in range(len(item))]
            elif type(item) is dict and all(type(x) in _NUMBER for x in item.values()):
                paths += [(key, k) for k in item]
                names += [f"{key}.{k}" for k in item]
            elif not (item is None or type(item) in (str, bool)):
                return None  # deeper structure: the checked path flattens it
        codes = [self._field_code(code, name) for name in names]
        if any(c < 0 for c in codes):
            return None
        return label_key, instance_key, paths, codes

    def _field_code(self, definition: int, name: str) -> int:
        key = (definition, name)
        code = self._field_codes.get(key)
        if code is None:
            if sum(1 for d, _ in self._field_codes if d == definition) >= MAX_FIELDS:
                self._dropped_fields.setdefault(definition, set()).add(name)
                return -1
            code = self._field_codes[key] = len(self.fields)
            self.fields.append((self.definitions[definition].id, name))
        return code

    def build(self) -> SimulatorMetrics:
        for code, names in self._dropped_fields.items():
            self.notes.append(f"metric {self.definitions[code].name!r} has more than {MAX_FIELDS} numeric fields; "
                              f"{len(names)} were not kept (e.g. {sorted(names)[0]!r})")

        def pack(columns: dict[str, array]) -> dict[str, np.ndarray]:
            # views on the arrays' buffers, not copies: the builder is done with them
            return {k: np.frombuffer(v, dtype=np.int64 if v.typecode == "q" else np.float64)
                    if len(v) else np.zeros(0, np.int64 if v.typecode == "q" else np.float64)
                    for k, v in columns.items()}

        return SimulatorMetrics(
            root=self.root, format=self.format, definitions=self.definitions, image_paths=self.image_paths,
            capture_keys=self.capture_keys, box_instance_ids=pack({"i": self.box_instances})["i"],
            box_offsets=pack({"i": self.box_offsets})["i"], iteration=pack({"i": self.iteration})["i"],
            seeds=self.seeds, objects=pack(self.objects), object_counts=pack(self.counts),
            values=pack(self.values), fields=self.fields, files=self.files, notes=self.notes)


def _extend(table: dict[str, array], targets: list[int], columns: dict[str, Any], n: int) -> None:
    """Append `n` rows per target image row: each column a list of n values or one value for all."""
    for row in targets:
        table["image"].extend([row] * n)
        for name, column in columns.items():
            table[name].extend(column if isinstance(column, list) else [column] * n)


def _field(value: Any, names: tuple[str, ...], where: str, required: bool = True) -> tuple[str, Any]:
    """(the key found, its value) of the first of `names` in object `value`; (names[0], None) if absent
    and not required."""
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: expected an object with field {names[0]!r}, got {_short(value)}")
    for name in names:
        if name in value:
            return name, value[name]
    if required:
        raise DatasetError(f"{where}: missing field {' or '.join(map(repr, names))}")
    return names[0], None


def _number(name: str, value: Any, where: str, minimum: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DatasetError(f"{where}: field {name!r} must be a number, got {_short(value)}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > _HUGE:
        raise DatasetError(f"{where}: field {name!r} must be a finite number below 1e15, got {_short(value)}")
    if minimum is not None and number < minimum:
        raise DatasetError(f"{where}: field {name!r} must be at least {minimum:g}, got {_short(value)}")
    return number


def _integer(name: str, value: Any, where: str) -> int:
    number = _number(name, value, where)
    if not number.is_integer():
        raise DatasetError(f"{where}: field {name!r} must be a whole number, got {_short(value)}")
    return int(number)


def _flatten(value: Any, prefix: str, out: list[tuple[str, float]], where: str, depth: int) -> None:
    """Append (field name, number) for every numeric leaf of `value`; NaN or huge numbers raise DatasetError."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        out.append((prefix or "value", _number(prefix or "value", value, where)))
        return
    if depth >= MAX_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _LABEL_KEYS or key in _INSTANCE_KEYS:
                continue
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out, where, depth + 1)
    elif isinstance(value, list):
        axes = 2 <= len(value) <= 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        for i, item in enumerate(value):
            name = f"{prefix or 'value'}.{_AXES[i]}" if axes else f"{prefix or 'value'}[{i}]"
            _flatten(item, name, out, where, depth + 1)


def _short(value: Any, limit: int = 120) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."
