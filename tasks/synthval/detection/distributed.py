"""Several GPUs in one pod: rank and world size from torchrun's environment, reductions, device choice.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts; without them everything here
degrades to a single process. Only the main process (rank 0) logs progress and writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from synthval.errors import ConfigError

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    # The launcher's contract, not user configuration: cli.py stays the only reader of user settings.
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group when launched by it; return whether training is distributed."""
    if _env_int("WORLD_SIZE", 1) <= 1 or (dist.is_available() and dist.is_initialized()):
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Return the values summed (or averaged) over all processes; unchanged in a single process."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    with torch.no_grad():
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size()
    return dict(zip(names, stacked))


def all_gather_objects(obj: Any) -> list[Any]:
    """Return every process's `obj`, in rank order (a one-item list in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a config value: "auto" is CUDA if available, else the CPU.

    Under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def resolve_amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for a config value, or None for full precision.

    "auto": bf16 where the GPU supports it, else fp16; on the CPU always None (CPU autocast is slower
    than fp32 for these models).
    """
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("amp: 'bf16' asked for, but this GPU does not support bfloat16; use fp16 or auto")
        return torch.bfloat16
    return torch.float16
