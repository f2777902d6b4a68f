"""The torch side of a DatasetIndex: images decoded on demand, targets in model class ids, and batches
grouped by aspect ratio (read from the index, never by decoding) so padded batches waste little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from synthval.data.index import DatasetIndex
from synthval.errors import DatasetError

# Mild colour jitter: product colours are what tells many grocery classes apart, so hue moves little.
_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}
_ADJUST = (v2.functional.adjust_brightness, v2.functional.adjust_contrast, v2.functional.adjust_saturation,
           v2.functional.adjust_hue)


class DetectionDataset(Dataset):
    """Image i of `index` as (float32 CHW tensor in [0, 1], {"boxes", "labels", "image_id"}).

    `class_ids` maps dataset label ids to model class ids (LabelSpace.class_ids); boxes with other
    labels are dropped, and so are COCO crowd regions (`iscrowd`), which are not single objects. With `train`, the image is flipped left-right with probability `hflip_prob`
    (boxes follow) and, with `photometric`, colour-jittered; without `train` neither happens.

    The random draws of image i are a function of (`seed`, the epoch set by `set_epoch`, i) alone, never
    of a generator's position: a run resumed in the middle of an epoch, any number of loader workers and
    any number of processes augment every image exactly as an uninterrupted run does.
    """

    def __init__(self, index: DatasetIndex, class_ids: dict[int, int], train: bool = False,
                 hflip_prob: float = 0.0, photometric: bool = False, seed: int = 0):
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.index = index
        self.class_ids = dict(class_ids)
        self.train = train
        self.hflip_prob = hflip_prob if train else 0.0
        self.photometric = train and photometric
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of `epoch` (set before the DataLoader's workers start)."""
        self.epoch = epoch

    def _generator(self, i: int) -> torch.Generator:
        key = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(key))

    def __len__(self) -> int:
        return len(self.index)

    def target(self, i: int) -> dict:
        """The target of image i without decoding it: boxes in pixels (xyxy) and model class ids."""
        record = self.index.images[i]
        keep = np.fromiter((label in self.class_ids for label in record.labels.tolist()), dtype=bool,
                           count=len(record.labels)) & ~record.iscrowd
        labels = [self.class_ids[label] for label in record.labels[keep].tolist()]
        return {
            "boxes": torch.from_numpy(np.array(record.boxes[keep], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": record.image_id,
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        record = self.index.images[i]
        image = read_image(record.path)
        if image.shape[1:] != (record.height, record.width):
            raise DatasetError(f"{record.path}: decoded size {image.shape[2]}x{image.shape[1]} differs from the "
                               f"{record.width}x{record.height} the annotations give; boxes would not fit")
        target = self.target(i)
        if not (self.hflip_prob or self.photometric):
            return image.to(torch.float32).div_(255.0), target
        g = self._generator(i)
        if self.hflip_prob and torch.rand((), generator=g) < self.hflip_prob:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack([record.width - boxes[:, 2], boxes[:, 1],
                                           record.width - boxes[:, 0], boxes[:, 3]], dim=1)
        if self.photometric:
            image = color_jitter(image, g)
        return image.to(torch.float32).div_(255.0), target


def color_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter with `_JITTER`'s ranges (brightness, contrast, saturation and hue in a
    random order), its draws taken from `generator` rather than torch's global one."""
    b, c, s, h = (_JITTER[k] for k in ("brightness", "contrast", "saturation", "hue"))
    low = torch.tensor([1 - b, 1 - c, 1 - s, -h])
    factors = (low + torch.rand(4, generator=generator) * (torch.tensor([1 + b, 1 + c, 1 + s, h]) - low)).tolist()
    for k in torch.randperm(4, generator=generator).tolist():
        image = _ADJUST[k](image, factors[k])
    return image


def read_image(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); alpha is dropped, EXIF orientation not applied.

    PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    """
    try:
        with Image.open(path) as pil:
            array = np.array(pil.convert("RGB"))  # writable: torch tensors must be
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be decoded as an image ({exc})") from exc
    return torch.from_numpy(array).permute(2, 0, 1)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images of different sizes apart: ([image, ...], [target, ...]) for torchvision detectors."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def aspect_ratio_groups(aspect_ratios: np.ndarray, group_factor: int) -> np.ndarray:
    """Group id per image: aspect ratio binned on 2*group_factor+1 log-spaced edges between 1/2 and 2
    (torchvision's references/detection scheme); group_factor 0 puts every image in one group."""
    if group_factor <= 0:
        return np.zeros(len(aspect_ratios), dtype=np.int64)
    edges = 2.0 ** np.linspace(-1, 1, 2 * group_factor + 1)
    return np.digitize(np.asarray(aspect_ratios, dtype=np.float64), edges).astype(np.int64)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share an aspect-ratio group; every image exactly once per pass.

    Per pass: the images are shuffled (seeded by `seed` and the epoch), each group is cut into full
    batches in that order, the remainders of all groups are pooled into mixed batches (the last may be
    short), and with `shuffle` the batch order is shuffled too. Each pass advances the epoch; call
    `set_epoch(e)` before a pass (e.g. on resume) to replay epoch e exactly.
    """

    def __init__(self, group_ids: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n, size = len(self.group_ids), self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        leftovers: list[np.ndarray] = []
        ordered_groups = self.group_ids[order]
        for group in np.unique(ordered_groups):
            members = order[ordered_groups == group]
            full = len(members) // size * size
            batches += [members[s:s + size].tolist() for s in range(0, full, size)]
            leftovers.append(members[full:])
        # the remainders, in pass order across groups rather than group by group
        pooled = order[np.isin(order, np.concatenate(leftovers))] if leftovers else order[:0]
        batches += [pooled[s:s + size].tolist() for s in range(0, len(pooled), size)]
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        yield from batches

    def __len__(self) -> int:
        counts = np.bincount(self.group_ids - self.group_ids.min()) if len(self.group_ids) else np.zeros(0)
        size = self.batch_size
        full = int((counts // size).sum())
        rest = int((counts % size).sum())
        return full + -(-rest // size)


def build_batch_sampler(index: DatasetIndex, batch_size: int, group_factor: int, seed: int,
                        shuffle: bool = True) -> GroupedBatchSampler:
    """A batch sampler over `index` grouped by aspect ratio (from the index); pass it as `batch_sampler`."""
    return GroupedBatchSampler(aspect_ratio_groups(index.aspect_ratios(), group_factor), batch_size,
                               seed=seed, shuffle=shuffle)
