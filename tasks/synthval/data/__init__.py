"""Datasets: Perception 0.0.1, SOLO, COCO and GroceriesReal (`readers/`) into one `DatasetIndex`, its splits,
labels matched by name, the torch `Dataset`, and what the simulator measured beside the boxes.

`load_dataset` is the entry point (`load_ground_truth` reads the annotations alone, for scoring);
`LabelSpace`/`match_labels` line model classes up with a dataset's labels by name; `DetectionDataset` and `build_batch_sampler` feed an index to torch. The torch names are
imported on first use, so reading an index does not import torch.
"""

from synthval.data.index import DatasetIndex, ImageRecord
from synthval.data.labels import LabelMatch, LabelSpace, match_labels
from synthval.data.loader import FORMATS, default_split, detect_format, load_dataset, load_ground_truth

__all__ = [
    "FORMATS", "DatasetIndex", "DetectionDataset", "GroupedBatchSampler", "ImageRecord", "LabelMatch",
    "LabelSpace", "build_batch_sampler", "collate_detection", "default_split", "detect_format", "load_dataset", "load_ground_truth",
    "match_labels",
]
_TORCH_NAMES = ("DetectionDataset", "GroupedBatchSampler", "build_batch_sampler", "collate_detection")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from synthval.data import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(f"module 'synthval.data' has no attribute {name!r}")
