"""Which images a split holds, and the seeded order in which a real-image budget is drawn from it.

- A dataset that defines its own splits (GroceriesReal's groceries_real_<split>.txt) is split by those
  files; any split file present is accepted.
- Every other dataset is partitioned 80/10/10 into train/val/test by a permutation with a fixed seed
  (`PARTITION_SEED`): the same dataset always gives the same, disjoint splits that cover it. The run's
  seed does not move the partition on purpose: evaluation loads "test" without the training seed, and
  runs repeated over seeds must share one test set, so a seed-dependent partition would leak training
  images into the test split.
- "seed-train" / "seed-val" are the seed's synthetic split (datasetinsights 0.2.x, datasets/synthetic.py):
  scikit-learn's `train_test_split(catalog, train_size=0.9, random_state=47)` over the images in reader
  order, reproduced with numpy alone. The seed split its catalog after dropping captures without boxes
  or image files; the membership is the seed's where the dataset has none of those.
- "all" (or None) is every image.
- A budget of N images (`max_images`) is the first N usable images of the split in a permutation by
  the run's seed, so budgets drawn with one seed are nested: the 76 images are among the 380.
"""

from __future__ import annotations

import math

import numpy as np

from synthval.data.index import RawIndex
from synthval.errors import DatasetError

PARTITION = {"train": 0.8, "val": 0.1, "test": 0.1}  # val and test rounded half up; train the rest
PARTITION_SEED = 0
ALL = "all"
SEED_TRAIN, SEED_VAL = "seed-train", "seed-val"
SEED_SPLIT_SEED, SEED_TRAIN_FRACTION = 47, 0.9
# A stream of its own, so a budget's order is unrelated to the partition's permutation.
_BUDGET_STREAM = 0x62756467


def split_positions(raw: RawIndex, split: str | None) -> np.ndarray:
    """Positions (ascending, int64) of the images of `split` in `raw`; unknown split -> DatasetError."""
    n = len(raw)
    if split is None or split == ALL:
        return np.arange(n, dtype=np.int64)
    if split in (SEED_TRAIN, SEED_VAL):
        positions = seed_partition(n)[split]
        if len(positions) == 0:
            raise DatasetError(f"{raw.root}: split {split!r} is empty: {n} images are too few for a 90/10 split")
        return positions
    if raw.split_files:
        path = raw.split_files.get(split)
        if path is None:
            raise DatasetError(f"{raw.root}: no split {split!r}; the split files there define: "
                               f"{', '.join(sorted(raw.split_files))} (or 'all')")
        return read_split_file(path, n)
    if split not in PARTITION:
        raise DatasetError(f"{raw.root}: unknown split {split!r}; a {raw.format} dataset is split 80/10/10 "
                           f"into {', '.join(PARTITION)} (or 'all')")
    positions = partition(n)[split]
    if len(positions) == 0:
        raise DatasetError(f"{raw.root}: split {split!r} is empty: 10% of {n} images rounds to none; "
                           "use split 'all' or a larger dataset")
    return positions


def partition(n: int) -> dict[str, np.ndarray]:
    """{"train", "val", "test"}: disjoint ascending positions covering range(n), 80/10/10 (rounded)."""
    perm = np.random.default_rng(PARTITION_SEED).permutation(n)
    n_val = int(n * PARTITION["val"] + 0.5)
    n_test = int(n * PARTITION["test"] + 0.5)
    n_train = n - n_val - n_test
    cuts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {name: np.sort(p).astype(np.int64) for name, p in cuts.items()}


def seed_partition(n: int) -> dict[str, np.ndarray]:
    """{"seed-train", "seed-val"}: ascending positions of train_test_split(range(n), train_size=0.9,
    random_state=47): floor(0.9 n) train images, the rest val, cut from RandomState(47).permutation(n)."""
    perm = np.random.RandomState(SEED_SPLIT_SEED).permutation(n)
    n_train = math.floor(SEED_TRAIN_FRACTION * n)
    n_val = n - n_train
    return {SEED_VAL: np.sort(perm[:n_val]).astype(np.int64),
            SEED_TRAIN: np.sort(perm[n_val:n_val + n_train]).astype(np.int64)}


def budget_order(positions: np.ndarray, seed: int) -> np.ndarray:
    """`positions` in the seeded order a budget takes them: the first N are the N-image budget."""
    rng = np.random.default_rng([seed, _BUDGET_STREAM])
    return positions[rng.permutation(len(positions))]


def read_split_file(path: str, n: int) -> np.ndarray:
    """Indices (0-based, into a list of `n` images) from a split file: whitespace-separated integers.

    One per line is the usual layout; datasetinsights' files hold them space-separated on one line, so
    both are accepted. Bad tokens, out-of-range and repeated indices raise DatasetError naming the line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from exc
    out: list[int] = []
    seen: dict[int, int] = {}
    for line_no, line in enumerate(lines, start=1):
        for token in line.split():
            try:
                index = int(token)
            except ValueError:
                raise DatasetError(f"{path}: line {line_no}: {token!r} is not an integer index into "
                                   "annotations.json") from None
            if not 0 <= index < n:
                raise DatasetError(f"{path}: line {line_no}: index {index} is out of range; annotations.json "
                                   f"holds {n} images (0..{n - 1})")
            if index in seen:
                raise DatasetError(f"{path}: line {line_no}: index {index} repeats line {seen[index]}")
            seen[index] = line_no
            out.append(index)
    if not out:
        raise DatasetError(f"{path}: the split file lists no images")
    return np.sort(np.array(out, dtype=np.int64))
