"""Statistics of what the simulator measured (a `data.simulator.SimulatorMetrics`) over one dataset index.

Per box: its visible pixels (RenderedObjectInfo, found by image and instance id) and its visible
fraction, visible pixels / box area: near 1 for an object seen whole that fills its box, lower for one
that is occluded, cut by the frame, or thin inside its box. Per image: the objects ObjectCount
counted. Per dataset: scenario iterations and random seeds. Per generic metric a randomizer wrote
(light, object placement, ...): the distribution of each numeric field. Only the index's images (its
split) count. Whatever is missing or partial is said in `notes`, one line each, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.data.index import DatasetIndex
from synthval.data.simulator import GENERIC, OBJECT_COUNT, RENDERED_OBJECT_INFO, SimulatorMetrics

NO_RENDERED_OBJECT_INFO = "No RenderedObjectInfo metric: the visible-pixel statistics are left out."


@dataclass
class SimulatorStats:
    """What the simulator measured on the images of one index.

    `visible_pixels` and `visible_fraction` hold one value per box of the index, in box order (NaN:
    unknown), or are None without RenderedObjectInfo; `object_visible_pixels` holds every
    RenderedObjectInfo entry on the index's images (boxed or not). `object_counts` holds the objects
    ObjectCount counted per image that has the metric (None without it). `generic` maps a metric's name
    to {field: values}.
    """

    definitions: list[dict[str, Any]]
    visible_pixels: np.ndarray | None
    visible_fraction: np.ndarray | None
    object_visible_pixels: np.ndarray
    object_counts: np.ndarray | None
    object_count_by_label: dict[str, int]
    iterations: int
    images_with_iteration: int
    seeds: list[float]
    generic: dict[str, dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)


def simulator_stats(index: DatasetIndex, metrics: SimulatorMetrics) -> SimulatorStats:
    """Join `metrics` to `index` by image path and instance id; return what they measured on its images."""
    notes = list(metrics.notes)
    rows = metrics.image_rows([r.path for r in index.images])
    missing = int(np.count_nonzero(rows < 0))
    if missing:
        notes.append(f"{missing} of {len(index)} images are not among the image captures the metrics pass read; "
                     "nothing the simulator measured is known of them.")
    in_index = np.zeros(len(metrics.image_paths) + 1, dtype=bool)  # the last slot is row -1: no image
    in_index[rows[rows >= 0]] = True
    counts = np.array([len(r.boxes) for r in index.images], dtype=np.int64)
    names_of = _label_namer(index, metrics)

    visible = fraction = None
    rendered = metrics.definitions_of(RENDERED_OBJECT_INFO)
    objects = metrics.objects
    on_index = in_index[objects["image"]]
    if not rendered or not on_index.any():
        notes.append(NO_RENDERED_OBJECT_INFO)
    else:
        visible = metrics.box_visible_pixels(rows, counts)
        boxes = np.concatenate([np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in index.images]) \
            if index.images else np.zeros((0, 4))
        area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
        fraction = visible / area
        unknown = int(np.count_nonzero(np.isnan(visible)))
        if unknown == len(visible) and len(visible):
            notes.append("RenderedObjectInfo names no instance that a 2D box names: visible pixels are known per "
                         "object, not per box, so there is no visible fraction.")
            fraction = None
        elif unknown:
            notes.append(f"{unknown} of {len(visible)} boxes have no RenderedObjectInfo entry for their image and "
                         "instance id: their visible fraction is unknown and left out.")
        if fraction is not None and np.count_nonzero(fraction > 1.01):
            notes.append(f"{int(np.count_nonzero(fraction > 1.01))} boxes have more visible pixels than box area "
                         "(visible fraction above 1): the box and RenderedObjectInfo disagree for them.")

    object_counts = None
    by_label: dict[str, int] = {}
    count_table = metrics.object_counts
    on_count = in_index[count_table["image"]]
    if metrics.definitions_of(OBJECT_COUNT) and on_count.any():
        per_image = np.bincount(count_table["image"][on_count], weights=count_table["count"][on_count],
                                minlength=len(metrics.image_paths))
        has = np.zeros(len(metrics.image_paths), dtype=bool)
        has[count_table["image"][on_count]] = True
        object_counts = per_image[has]
        for definition, label, count in zip(count_table["definition"][on_count].tolist(),
                                            count_table["label_id"][on_count].tolist(),
                                            count_table["count"][on_count].tolist()):
            name = names_of(definition, label)
            by_label[name] = by_label.get(name, 0) + int(count)

    iterations = metrics.iteration[rows[rows >= 0]]
    iterations = iterations[iterations >= 0]
    unattached = sum(d.records - d.attached for d in metrics.definitions)
    if unattached:
        notes.append(f"{unattached} metric records describe no image of this dataset (another sensor's capture, "
                     "an unknown capture id, or no capture at all): read and checked, not plotted.")
    undefined = [d.id for d in metrics.definitions if not d.defined]
    if undefined:
        notes.append(f"metrics {', '.join(map(repr, undefined))} are not in metric_definitions.json (or there is "
                     "none): named by their id, their kind told from it.")
    return SimulatorStats(
        definitions=[d.to_dict() for d in metrics.definitions], visible_pixels=visible, visible_fraction=fraction,
        object_visible_pixels=objects["visible_pixels"][on_index], object_counts=object_counts,
        object_count_by_label=dict(sorted(by_label.items(), key=lambda kv: -kv[1])),
        iterations=int(len(np.unique(iterations))), images_with_iteration=int(len(iterations)),
        seeds=list(metrics.seeds), generic=_generic_values(metrics, in_index), notes=notes)


def _generic_values(metrics: SimulatorMetrics, in_index: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{metric name: {field: values on the index's images}}, fields in the order first seen."""
    values = metrics.values
    keep = in_index[values["image"]]
    codes, numbers = values["field"][keep], values["value"][keep]
    order = np.argsort(codes, kind="stable")
    codes, numbers = codes[order], numbers[order]
    bounds = np.searchsorted(codes, np.arange(len(metrics.fields) + 1))
    names = {d.id: d.name for d in metrics.definitions if d.kind == GENERIC}
    out: dict[str, dict[str, np.ndarray]] = {}
    for code, (definition_id, name) in enumerate(metrics.fields):
        sample = numbers[bounds[code]:bounds[code + 1]]
        if definition_id in names and len(sample):
            out.setdefault(names[definition_id], {})[name] = sample
    return out


def _label_namer(index: DatasetIndex, metrics: SimulatorMetrics) -> Any:
    """name(definition code, label id): the metric definition's spec, else the index's labels, else 'label N'."""
    def name(definition: int, label: int) -> str:
        own = metrics.definitions[definition].label_names
        return own.get(label) or index.label_names.get(label) or f"label {label}"

    return name
