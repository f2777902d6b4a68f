"""The training step loop and batched prediction. No file I/O: `steps/train.py` does the wiring.

A "step" is one optimizer step; with gradient accumulation it takes `grad_accum_steps` batches.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from synthval.config import TrainConfig
from synthval.detection import distributed
from synthval.errors import TrainingDivergedError
from synthval.humanize import format_duration

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over the trainable parameters, as `config.optimizer` says."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def warmup_length(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up steps of a run of `total_steps`: `schedule.warmup_steps` scaled to the run's length where a
    reference length is given (the same fraction of the run, at least one step).

    A warm-up that would still run into the first decay (a step milestone, else the run's end) never
    reaches the peak rate; it is then scaled to end half-way to that decay, with a warning.
    """
    schedule = config.schedule
    warmup = schedule.warmup_steps
    reference = schedule.warmup_reference_steps
    if warmup and reference is not None and total_steps < reference:
        warmup = max(1, round(warmup * total_steps / reference))
    first_decay = total_steps
    if schedule.name == "step" and schedule.milestones:
        first_decay = min(first_decay, min(schedule.milestones) * steps_per_epoch)
    if warmup and warmup >= first_decay:
        fitted = max(first_decay // 2, 1) if first_decay > 1 else 0
        log.warning("schedule.warmup_steps=%d would not end before the first lr decay at step %d of %d; "
                    "warming up over %d steps instead (set schedule.warmup_reference_steps to scale it)",
                    warmup, first_decay, total_steps, fitted)
        warmup = fitted
    return warmup


def lr_factor(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Return the per-step learning-rate multiplier: linear warm-up to 1, then step decays at the
    milestone epochs, a cosine decay over the steps after the warm-up, or a constant rate."""
    schedule = config.schedule
    warmup = warmup_length(config, steps_per_epoch, total_steps)
    milestones = sorted(m * steps_per_epoch for m in schedule.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return schedule.warmup_factor + (1.0 - schedule.warmup_factor) * step / warmup
        if schedule.name == "step":
            return schedule.gamma ** bisect.bisect_right(milestones, step)
        if schedule.name == "cosine":
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step (milestones in `config.schedule` are epochs)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch, total_steps))


def _to_device(images: Iterable[torch.Tensor], targets: Iterable[dict], device: torch.device):
    non_blocking = device.type == "cuda"
    images = [img.to(device, non_blocking=non_blocking) for img in images]
    targets = [{k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    scaler: Any = None,
    amp_dtype: torch.dtype | None = None,
    grad_accum_steps: int = 1,
    max_steps: int | None = None,
    log_every: int = 20,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    global_step: int = 0,
    total_steps: int | None = None,
) -> dict[str, float]:
    """Train over `loader` once (or for `max_steps` optimizer steps); return the mean losses.

    `on_step(info)` runs after every optimizer step with info = {"epoch", "step" (steps done in this
    call), "global_step", "losses" (this step's, averaged over processes), "loss", "lr",
    "images_per_second"}. `global_step`/`total_steps` only make the progress lines show the whole run.
    A non-finite loss raises TrainingDivergedError naming the step and each loss part.
    The result holds the mean of each loss part and "loss", "steps", "images", "seconds",
    "images_per_second".
    """
    model.train()
    accum = max(int(grad_accum_steps), 1)
    try:
        steps_planned = len(loader) // accum  # type: ignore[arg-type]
    except TypeError:
        steps_planned = None
    if max_steps is not None:
        steps_planned = max_steps if steps_planned is None else min(steps_planned, max_steps)
    world = distributed.world_size()
    main = distributed.is_main_process()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)

    sums: dict[str, float] = defaultdict(float)
    step_losses: dict[str, float] = defaultdict(float)
    steps = images = micro = 0
    start = last_log = time.perf_counter()
    images_at_last_log = 0
    optimizer.zero_grad(set_to_none=True)
    if steps_planned == 0:
        return {"steps": 0, "images": 0, "seconds": 0.0, "images_per_second": 0.0}
    for batch_images, batch_targets in loader:
        batch_images, batch_targets = _to_device(batch_images, batch_targets, device)
        last_micro = micro + 1 == accum
        sync = model.no_sync() if (ddp and not last_micro) else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_dict = model(batch_images, batch_targets)
            loss = sum(loss_dict.values())
            reduced = distributed.reduce_dict({k: v.detach().float() for k, v in loss_dict.items()})
            parts = {k: float(v) for k, v in reduced.items()}
            total = sum(parts.values())
            if not math.isfinite(total):
                described = ", ".join(f"{k}={v:.4g}" for k, v in sorted(parts.items()))
                raise TrainingDivergedError(
                    f"loss became {total} at epoch {epoch}, step {global_step + steps + 1} "
                    f"(batch {micro + 1} of {accum}): {described}; lower optimizer.lr or raise "
                    "schedule.warmup_steps"
                )
            scaled = loss / accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        micro += 1
        images += len(batch_images) * world
        for k, v in parts.items():
            step_losses[k] += v / accum
        if not last_micro:
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        micro = 0
        steps += 1
        for k, v in step_losses.items():
            sums[k] += v
        step_total = sum(step_losses.values())
        sums["loss"] += step_total
        now = time.perf_counter()
        rate = images / max(now - start, 1e-9)
        info = {"epoch": epoch, "step": steps, "global_step": global_step + steps, "losses": dict(step_losses),
                "loss": step_total, "lr": lr, "images_per_second": rate}
        step_losses = defaultdict(float)
        if main and (steps % max(log_every, 1) == 0 or steps == steps_planned):
            window_rate = (images - images_at_last_log) / max(now - last_log, 1e-9)
            last_log, images_at_last_log = now, images
            per_step = (now - start) / steps
            if total_steps is not None:
                remaining = total_steps - global_step - steps
                where = f"step {global_step + steps}/{total_steps} (epoch {epoch}: {steps}/{steps_planned})"
            else:
                remaining = (steps_planned or steps) - steps
                where = f"epoch {epoch} step {steps}/{steps_planned if steps_planned is not None else '?'}"
            parts_text = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in sorted(info["losses"].items()))
            log.info("train %s loss=%.4f (%s) lr=%.3g %.1f img/s ETA %s", where, step_total, parts_text, lr,
                     window_rate, format_duration(remaining * per_step))
        if on_step is not None:
            on_step(info)
        if steps_planned is not None and steps >= steps_planned:
            break
    seconds = time.perf_counter() - start
    result = {k: v / max(steps, 1) for k, v in sums.items()}
    result.update(steps=steps, images=images, seconds=seconds, images_per_second=images / max(seconds, 1e-9))
    return result


@torch.no_grad()
def validation_loss(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
                    seed: int) -> dict[str, float]:
    """Mean losses over `loader` ("loss" and each part), averaged per image over all processes.

    torchvision's detectors compute losses only in training mode; as the seed did, validation runs them
    there, with every batch-norm layer held in eval mode so no running statistic moves. The RPN and box
    samplers draw from torch's generator, re-seeded with `seed` inside a fork: the validation loss is a
    function of the weights and the seed, and training's random stream is left exactly where it was.
    """
    model = unwrap(model)
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    sums: dict[str, float] = defaultdict(float)
    count = 0
    devices = [device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            for batch_images, batch_targets in loader:
                batch_images, batch_targets = _to_device(batch_images, batch_targets, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_dict = model(batch_images, batch_targets)
                for k, v in loss_dict.items():
                    sums[k] += float(v) * len(batch_images)
                count += len(batch_images)
    finally:
        model.train(was_training)
    names = sorted(sums)
    totals = distributed.reduce_dict({"count": torch.tensor(float(count)),
                                      **{k: torch.tensor(sums[k]) for k in names}}, average=False)
    n = max(float(totals["count"]), 1.0)
    means = {k: float(totals[k]) / n for k in names}
    means["loss"] = sum(means.values())
    return means


def _image_id(target: Any, fallback: int) -> int:
    if isinstance(target, dict) and "image_id" in target:
        value = target["image_id"]
        return int(value.item() if torch.is_tensor(value) else value)
    return fallback


def _to_float32(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _float32_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_float32(output)


def _float32_anchor_grid(module: nn.Module, args: Any) -> Any:
    # The anchor generator reads only the feature maps' shapes, dtype and device: hand it float32
    # stand-ins that take no memory (expanded scalars) instead of copies of the features.
    image_list, feature_maps = args
    return image_list, [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]


@contextlib.contextmanager
def float32_box_decoding(model: nn.Module) -> Iterator[None]:
    """Decode and post-process boxes in float32 while the rest of the model runs under autocast.

    torchvision's Faster R-CNN decodes boxes in the dtype of its regression outputs and builds anchors in
    the dtype of the feature maps: under a bfloat16 autocast both are bfloat16, whose 8-bit mantissa
    puts every coordinate above 512 px on a 4 px grid (and above 1024 px on an 8 px one), which moves
    mAP75 by points. Hooks cast the RPN head's and the box predictor's outputs to float32 and give the
    anchor generator float32 feature maps, so proposals, anchors, decoding, clipping and NMS are float32;
    the convolutions and linear layers keep the autocast dtype. A model without these parts is left as is.
    """
    rpn, roi_heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    hooks = []
    if rpn is not None:
        hooks.append(rpn.head.register_forward_hook(_float32_outputs))
        hooks.append(rpn.anchor_generator.register_forward_pre_hook(_float32_anchor_grid))
    if roi_heads is not None:
        hooks.append(roi_heads.box_predictor.register_forward_hook(_float32_outputs))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
            log_every_seconds: float = 10.0) -> list[dict]:
    """Run the model over `loader`; return one dict per image, in loader order.

    Each dict: {"image_id": int, "boxes": float32 (N, 4) xyxy in the image's pixels, "scores": float32 (N,),
    "labels": int64 (N,) model class ids}. With `amp_dtype` the network runs under that autocast, but
    boxes are decoded and post-processed in float32 (`float32_box_decoding`). Progress (images, rate,
    ETA) is logged every ~10 seconds.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[attr-defined]
    except TypeError:
        total = None
    results: list[dict] = []
    start = last = time.perf_counter()
    try:
        with float32_box_decoding(model):
            for batch_images, batch_targets in loader:
                images = [img.to(device, non_blocking=device.type == "cuda") for img in batch_images]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(images)
                for image, target, out in zip(images, batch_targets, outputs):
                    boxes = out["boxes"].float()
                    orig = target.get("orig_size") if isinstance(target, dict) else None
                    if orig is not None:
                        # The loader shrank the image: map boxes back to the original pixels.
                        oh, ow = (int(v) for v in (orig.tolist() if torch.is_tensor(orig) else orig))
                        h, w = image.shape[-2:]
                        if (oh, ow) != (h, w):
                            boxes = boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h], device=boxes.device)
                    results.append({
                        "image_id": _image_id(target, len(results)),
                        "boxes": boxes.cpu().numpy().astype(np.float32, copy=False).reshape(-1, 4),
                        "scores": out["scores"].float().cpu().numpy().astype(np.float32, copy=False),
                        "labels": out["labels"].cpu().numpy().astype(np.int64, copy=False),
                    })
                now = time.perf_counter()
                if now - last >= log_every_seconds and distributed.is_main_process():
                    last = now
                    rate = len(results) / (now - start)
                    eta = (total - len(results)) / rate if total and rate > 0 else float("nan")
                    log.info("predict %d/%s images, %.1f img/s, ETA %s", len(results), total if total else "?", rate,
                             format_duration(eta))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if distributed.is_main_process():
        log.info("predicted %d images in %.1f s (%.1f img/s)", len(results), seconds,
                 len(results) / max(seconds, 1e-9))
    return results
