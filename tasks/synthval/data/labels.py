"""Label spaces: which model class is which dataset label, matched by name.

A model trained on one dataset is scored on another whose label ids differ (SynthDet's synthetic
groceries and GroceriesReal number the same 63 products differently), so classes are matched by
name: exact after stripping whitespace, case-sensitive (a case-only difference is pointed out in
`LabelMatch.describe`, never merged silently: "Cereal" and "cereal" may be different classes).
"""

from __future__ import annotations

from dataclasses import dataclass

from synthval.data.index import DatasetIndex
from synthval.errors import DatasetError


def add_label(names: dict[int, str], label_id: int, name: object, where: str) -> None:
    """Add one entry of a dataset's label list to `names`; a blank name, or an id or a name (after
    stripping) listed twice, raises DatasetError naming `where` and the label: two entries of one id would
    silently overwrite each other, two of one name would merge two classes into one."""
    text = str(name).strip() if name is not None else ""
    if not text:
        raise DatasetError(f"{where}: label id {label_id} has a blank name")
    if label_id in names:
        raise DatasetError(f"{where}: label id {label_id} ({text!r}) is listed twice (also {names[label_id]!r})")
    for other_id, other in names.items():
        if other == text:
            raise DatasetError(f"{where}: label name {text!r} is listed twice (ids {other_id} and {label_id})")
    names[label_id] = text


@dataclass(frozen=True)
class LabelSpace:
    """A model's classes: class k (1-based; 0 is background) is `names[k - 1]`."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(str(n).strip() for n in self.names)
        if not names or any(not n for n in names):
            raise ValueError(f"a label space needs non-empty names, got {self.names!r}")
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"label names repeat: {repeated}")
        object.__setattr__(self, "names", names)

    @classmethod
    def from_index(cls, index: DatasetIndex) -> LabelSpace:
        """The dataset's labels as model classes, ordered by label id (a repeated name counts once)."""
        return cls(dataset_names(index))

    @property
    def num_classes(self) -> int:
        """Number of model outputs, background included."""
        return len(self.names) + 1

    def class_ids(self, index: DatasetIndex) -> dict[int, int]:
        """{dataset label id: model class id} for the labels whose names the model knows."""
        position = {name: k + 1 for k, name in enumerate(self.names)}
        return {label_id: position[name.strip()] for label_id, name in index.label_names.items()
                if name.strip() in position}


@dataclass(frozen=True)
class LabelMatch:
    """How a model's classes and a dataset's labels line up by name."""

    shared: tuple[str, ...]
    only_in_model: tuple[str, ...]
    only_in_data: tuple[str, ...]

    def describe(self) -> str:
        """One paragraph for a log or report: how many match, and which do not, by name."""
        total_model = len(self.shared) + len(self.only_in_model)
        total_data = len(self.shared) + len(self.only_in_data)
        if not self.only_in_model and not self.only_in_data:
            return f"All {len(self.shared)} labels match between the model and the dataset by name."
        parts = [f"{len(self.shared)} of the model's {total_model} classes match the dataset's {total_data} "
                 "labels by name."]
        if not self.shared:
            parts.append("No label is shared, so the dataset cannot train or score this model.")
        if self.only_in_model:
            parts.append(f"Model classes absent from the dataset (never trained or scored on it): "
                         f"{_names(self.only_in_model)}.")
        if self.only_in_data:
            parts.append(f"Dataset labels the model does not have (their boxes are left out): "
                         f"{_names(self.only_in_data)}.")
        folded = {n.casefold(): n for n in self.only_in_model}
        near = [f"{folded[n.casefold()]!r} vs {n!r}" for n in self.only_in_data if n.casefold() in folded]
        if near:
            parts.append(f"Names that differ only in case (not matched): {', '.join(near)}.")
        return " ".join(parts)


def match_labels(space: LabelSpace, index: DatasetIndex) -> LabelMatch:
    """Compare a model's classes with a dataset's labels by name (model order, then label-id order)."""
    data_names = dataset_names(index)
    data_set, model_set = set(data_names), set(space.names)
    return LabelMatch(
        shared=tuple(n for n in space.names if n in data_set),
        only_in_model=tuple(n for n in space.names if n not in data_set),
        only_in_data=tuple(n for n in data_names if n not in model_set),
    )


def dataset_names(index: DatasetIndex) -> tuple[str, ...]:
    """The dataset's label names in label-id order, stripped, each once."""
    return tuple(dict.fromkeys(index.label_names[i].strip() for i in sorted(index.label_names)))


def _names(names: tuple[str, ...], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
