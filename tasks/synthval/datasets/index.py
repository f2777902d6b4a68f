"""The one in-memory index every reader produces: images, sizes, boxes and labels, no pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
