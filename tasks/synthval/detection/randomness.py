"""Random streams a training run can restore exactly, so that a resumed run ends as an uninterrupted one.

Every random draw of a run is either restored from its checkpoint or a pure function of the seed: a
purpose's stream seed (`stream_seed`), the epoch's batch order and each process's share of it
(`EpochBatches`), and the process's own random state (`rng_state` / `restore_rng`, per rank).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from synthval.detection import distributed


def stream_seed(*keys: int) -> int:
    """A 64-bit seed drawn from `keys` (the run's seed, a purpose, a rank, an epoch...): unrelated streams
    for unrelated keys, where `seed + rank` would give run 0's rank 1 the stream of run 1's rank 0."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


class EpochBatches(torch.utils.data.Sampler):
    """This process's batches of one epoch, after the first `skip` batches (of all processes together).

    Batch i of the epoch's order goes to process i % world_size, and only the first `per_epoch` batches
    (whole optimizer steps of every process) are used. The order is a function of the seed and the
    epoch, and a step takes the same batches whatever the process count, so a resumed run skips exactly
    the batches its checkpoint had trained on.
    """

    def __init__(self, batch_sampler: Any, epoch: int, per_epoch: int, skip: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = epoch
        self.per_epoch = per_epoch
        self.skip = skip
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def __len__(self) -> int:
        return max(self.per_epoch - self.skip, 0) // self.world

    def __iter__(self) -> Iterator[list[int]]:
        self.batch_sampler.set_epoch(self.epoch)
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.per_epoch:
                break
            if i >= self.skip and i % self.world == self.rank:
                yield batch


def seed_process(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random state (Python, numpy, torch, CUDA), storable in a weights-only checkpoint."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's key array as a tensor: the checkpoint stays loadable with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the state `rng_state` returned (CUDA only on the same number of devices)."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
