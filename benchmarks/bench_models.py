"""Training images per second for each detector on this machine's device, and what the small heads buy.

Each case builds the model as `synthval train` would (same builder, same config fields), then times full
optimizer steps (forward, backward, AdamW step) on a fixed batch of synthetic images holding a few boxes
each, after warm-up steps. No data loading is timed: this is the model's own speed.

    python benchmarks/bench_models.py [--seconds 20] [--cases tiny,tiny-default-heads,...] [--threads N]

Cases (CPU by default; on a GPU the GPU cases run, with bf16/fp16 autocast as training uses):
- tiny: the cpu-demo preset (small conv backbone, RoI pool 5, box head 256, 64 RoIs per image), 192 px.
- tiny-default-heads: the same backbone with torchvision's default heads (RoI pool 7, box head 1024,
  512 RoIs per image) and the same RPN settings: the baseline the small heads are measured against.
- mobilenet_v3_large_320_fpn at 320 px; resnet50_fpn at 320 px on CPU (800 px on GPU, its default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

# GNU OpenMP threads spin while they wait; on a shared 2-core machine that made 2 threads 8-10x slower
# than 1 (measured with this script). Passive waiting must be chosen before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks"))

from synthval.detection import distributed  # noqa: E402
from synthval.config import PRESETS, ModelConfig, TrainConfig, from_dict  # noqa: E402
from synthval.detection.engine import build_optimizer  # noqa: E402
from synthval.detection.model import build_model  # noqa: E402

NUM_CLASSES = 11  # ten procedural grocery classes + background


def cpu_demo() -> ModelConfig:
    return from_dict(ModelConfig, PRESETS["cpu-demo"]["model"])


def cases(device: torch.device) -> dict[str, tuple[ModelConfig, int, int]]:
    """name -> (model config, image size, batch size)."""
    tiny = cpu_demo()
    default_heads = dataclasses.replace(tiny, roi_pool_size=7, box_head_dim=1024, box_batch_size_per_image=512)
    if device.type == "cuda":
        return {
            "tiny": (dataclasses.replace(tiny, min_size=512, max_size=512), 512, 16),
            "tiny-default-heads": (dataclasses.replace(default_heads, min_size=512, max_size=512), 512, 16),
            "mobilenet_v3_large_320_fpn": (ModelConfig(name="mobilenet_v3_large_320_fpn"), 320, 16),
            "mobilenet_v3_large_fpn": (ModelConfig(name="mobilenet_v3_large_fpn"), 800, 8),
            "resnet50_fpn": (ModelConfig(name="resnet50_fpn"), 800, 8),
            "resnet50_fpn_v2": (ModelConfig(name="resnet50_fpn_v2"), 800, 8),
        }
    return {
        "tiny": (tiny, 192, 8),
        "tiny-default-heads": (default_heads, 192, 8),
        "mobilenet_v3_large_320_fpn": (ModelConfig(name="mobilenet_v3_large_320_fpn"), 320, 4),
        "resnet50_fpn": (ModelConfig(name="resnet50_fpn", min_size=320, max_size=320), 320, 2),
    }


def make_batch(n: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(5):
            s = int(torch.randint(size // 10, size // 3, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            label = int(torch.randint(1, NUM_CLASSES, (1,), generator=g))
            image[label % 3, y:y + s, x:x + s] = 0.5 + label / 40
            boxes.append([x, y, x + s, y + s])
            labels.append(label)
        images.append(image.to(device))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                        "labels": torch.tensor(labels, device=device)})
    return images, targets


def time_case(config: ModelConfig, size: int, batch: int, device: torch.device, seconds: float,
              amp_dtype: torch.dtype | None, warmup: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    config = dataclasses.replace(config, min_size=size, max_size=size)
    model = build_model(config, NUM_CLASSES).to(device).train()
    train_config = from_dict(TrainConfig, {"optimizer": {"name": "adamw", "lr": 1e-4}})
    optimizer = build_optimizer(train_config, model)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    images, targets = make_batch(batch, size, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = sum(model(images, targets).values())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and steps >= 3:
            break
    return {"steps": steps, "seconds_per_step": elapsed / steps, "images_per_second": steps * batch / elapsed,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case (after warm-up)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device)
    amp_dtype = distributed.resolve_amp_dtype(args.amp, device)
    available = cases(device)
    chosen = args.cases.split(",") if args.cases else list(available)
    unknown = [c for c in chosen if c not in available]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choices on {device.type}: {', '.join(available)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), amp: {amp_dtype or 'off'}")
    print(f"{'case':<28} {'size':>5} {'batch':>5} {'params':>8} {'s/step':>8} {'img/s':>8}")
    results = {}
    for case in chosen:
        config, size, batch = available[case]
        r = time_case(config, size, batch, device, args.seconds, amp_dtype)
        results[case] = r
        print(f"{case:<28} {size:>5} {batch:>5} {r['params_m']:>7.1f}M {r['seconds_per_step']:>8.3f} "
              f"{r['images_per_second']:>8.2f}", flush=True)
    if "tiny" in results and "tiny-default-heads" in results:
        ratio = results["tiny"]["images_per_second"] / results["tiny-default-heads"]["images_per_second"]
        print(f"tiny (RoI pool 5, head 256, 64 RoIs) vs torchvision's default heads (7, 1024, 512) on the same "
              f"backbone: {ratio:.2f}x the images per second")


if __name__ == "__main__":
    main()
