"""Training speed of the seed recipe (fp32, and bf16) against torchvision's reference trainer, and the input
pipeline's speed per CPU core against the reference's PIL pipeline, on the same images and batch.

    python benchmarks/bench_train.py [--device auto] [--image-size 800x1333] [--batch 2] [--iterations 60]
                                     [--workers 4] [--torchvision-references PATH] [--toy]

A COCO-layout folder of JPEG images (HxW, a few boxes each) is written to a temporary folder. Each trainer
trains ResNet-50-FPN at the image size for --iterations optimizer steps of --batch images read from it
(decoding included, as in a real run), timed from its first batch request to its last step:

- reference: torchvision's references/detection/train.py behaviour: PIL decode, horizontal flip,
  PILToTensor and float, `model(images, targets)`, SGD, and with --amp (on CUDA) fp16 autocast with a
  GradScaler; the model is torchvision's fasterrcnn_resnet50_fpn on an ImageNet backbone (frozen batch
  norm, 3 trainable layers). With --torchvision-references PATH (a torchvision checkout; the scripts are not
  in the wheel) the real `references/detection/train.py --amp` runs instead, for one epoch over the same
  images, and its "Total time (s / it)" line is the figure. Its ImageNet file is a random one in a temporary
  torch cache, so nothing is downloaded.
- synthval seed: `synthval train`'s loader and loop with the seed-synthetic preset's model (frozen batch
  norm with eps 0, layer2-layer4 trainable, Adam), in fp32 as the seed trained;
- synthval seed + bf16: the same under bf16 autocast (synthval's amp=auto on GPUs that support it).

Then the input pipelines on one thread: synthval's DetectionDataset (decode, flip, to float) against the
reference's (PIL decode, RandomHorizontalFlip, PILToTensor, ConvertImageDtype; its presets.py when PATH is
given), in images per second per CPU core.

--toy: 96x128 images, batch 2, 3 steps, no loader workers; runs on a CPU in under a minute (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

# GNU OpenMP threads spin while they wait; on a shared 2-core machine that made 2 threads 8-10x slower
# than 1 (bench measurements). Passive waiting must be chosen before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks"))

from synthval.detection import distributed  # noqa: E402
from synthval.config import TrainConfig, load_config  # noqa: E402
from synthval.data import DetectionDataset, LabelSpace, build_batch_sampler, collate_detection, load_dataset  # noqa: E402
from synthval.detection.engine import build_optimizer, train_one_epoch  # noqa: E402
from synthval.detection.model import build_model, load_model_state  # noqa: E402

NUM_LABELS = 10


# --- the images ----------------------------------------------------------------------------------------


def write_coco(root: str, n: int, height: int, width: int, seed: int = 0) -> str:
    """JPEGs in root/images (also reachable as train2017/ and val2017/, the reference's layout) with COCO
    annotations in annotations/instances_{train,val}2017.json; returns the train annotation file."""
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(root, "images")
    os.makedirs(images_dir)
    os.makedirs(os.path.join(root, "annotations"))
    for alias in ("train2017", "val2017"):
        os.symlink("images", os.path.join(root, alias))
    images, annotations = [], []
    for i in range(n):
        base = rng.integers(40, 200, 3)
        gradient = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
        noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
        pixels = np.clip(base[None, None, :] + gradient + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            s = int(rng.integers(min(height, width) // 8, min(height, width) // 3))
            x, y = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
            label = int(rng.integers(1, NUM_LABELS + 1))
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label,
                                "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
        name = f"img_{i:05d}.jpg"
        image.save(os.path.join(images_dir, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": k, "name": f"product_{k}"} for k in range(1, NUM_LABELS + 1)]}
    for split in ("train", "val"):
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(doc, f)
    return os.path.join(root, "annotations", "instances_train2017.json")


# --- the reference's behaviour ---------------------------------------------------------------------------


class ReferencePipeline(torch.utils.data.Dataset):
    """What references/detection does per image: PIL decode, flip at p=0.5 (boxes follow), PILToTensor,
    float in [0, 1]; `transforms` replaces the last three with the reference's own presets when given."""

    def __init__(self, annotation_file: str, transforms=None) -> None:
        with open(annotation_file) as f:
            doc = json.load(f)
        folder = os.path.join(os.path.dirname(os.path.dirname(annotation_file)), "images")
        by_image: dict[int, list] = {}
        for a in doc["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        self.items = [(os.path.join(folder, im["file_name"]), by_image.get(im["id"], []), im["id"])
                      for im in doc["images"]]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from torchvision.transforms import functional as F

        path, anns, image_id = self.items[i]
        image = Image.open(path).convert("RGB")
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                  "image_id": image_id}
        if self.transforms is not None:
            return self.transforms(image, target)
        if torch.rand(1) < 0.5:
            image = F.hflip(image)
            w = image.width
            boxes = target["boxes"]
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return F.convert_image_dtype(F.pil_to_tensor(image), torch.float32), target


def reference_model(num_classes: int, min_size: int, max_size: int):
    """torchvision's fasterrcnn_resnet50_fpn on an ImageNet backbone (frozen batch norm, 3 trainable layers),
    with the same random weights each call: the step time depends on them (how many proposals survive
    NMS), so every trainer here starts from these."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                       trainable_layers=3)
        return FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size)


def run_reference_loop(annotation_file: str, args, device: torch.device) -> float:
    """The reference's training loop on the same images; returns images per second."""
    torch.manual_seed(0)
    model = reference_model(NUM_LABELS + 1, args.min_size, args.max_size).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    dataset = ReferencePipeline(annotation_file)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset), args.batch, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=lambda batch: tuple(zip(*batch)))
    _sync(device)
    start = time.perf_counter()
    steps = 0
    for images, targets in loader:
        images = [img.to(device) for img in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        steps += 1
        if steps >= args.iterations:
            break
    _sync(device)
    return steps * args.batch / (time.perf_counter() - start)


def run_real_reference(references: str, coco_root: str, args, device: torch.device, work: str) -> float:
    """torchvision's own references/detection/train.py, one epoch; images per second from its timing line."""
    import torchvision

    script_dir = os.path.join(references, "references", "detection")
    if not os.path.isfile(os.path.join(script_dir, "train.py")):
        raise SystemExit(f"--torchvision-references {references}: no references/detection/train.py there")
    torch_home = os.path.join(work, "torch-home")
    env = dict(os.environ, TORCH_HOME=torch_home)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cache_file = os.path.join(torch_home, "hub", "checkpoints", os.path.basename(url))
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), cache_file)  # random, so no download
    command = [sys.executable, "train.py", "--data-path", coco_root, "--dataset", "coco",
               "--model", "fasterrcnn_resnet50_fpn", "--device", device.type, "-b", str(args.batch), "--epochs", "1",
               "-j", str(args.workers), "--print-freq", "1000000", "--output-dir", "",
               "--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1", "--trainable-backbone-layers", "3",
               *(["--amp"] if device.type == "cuda" else []), *args.reference_arg]
    print("running:", " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=script_dir, env=env, capture_output=True, text=True, check=False)
    match = re.search(r"Epoch: \[0\] Total time: \S+ \(([\d.]+) s / it\)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"the reference failed or printed no timing line:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return args.batch / float(match.group(1))


# --- synthval ---------------------------------------------------------------------------------------


def synthval_config(args) -> TrainConfig:
    config = load_config(TrainConfig, preset="seed-synthetic", overrides=[
        f"model.min_size={args.min_size}", f"model.max_size={args.max_size}", f"data.batch_size={args.batch}",
        "data.effective_batch_size=null", f"data.num_workers={args.workers}", "data.hflip_prob=0.5"])
    return config


def run_synthval(annotation_file: str, args, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """`synthval train`'s loader and loop with the seed preset's model; returns images per second."""
    torch.manual_seed(0)
    config = synthval_config(args)
    index = load_dataset(annotation_file, format="coco")
    space = LabelSpace.from_index(index)
    model = build_model(config.model, space.num_classes, load_backbone_weights=False)
    load_model_state(model, reference_model(space.num_classes, args.min_size, args.max_size).state_dict(), "bench")
    model.to(device)
    optimizer = build_optimizer(config, model)
    dataset = DetectionDataset(index, space.class_ids(index), train=True, hflip_prob=config.data.hflip_prob)
    sampler = build_batch_sampler(index, args.batch, config.data.aspect_ratio_group_factor, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=collate_detection, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    _sync(device)
    start = time.perf_counter()
    stats = train_one_epoch(model, optimizer, None, loader, device, 0, amp_dtype=amp_dtype,
                            max_steps=args.iterations, log_every=10**9)
    _sync(device)
    return stats["steps"] * args.batch / (time.perf_counter() - start)


# --- input pipelines per core ----------------------------------------------------------------------------


def pipeline_rates(annotation_file: str, references: str | None, seconds: float) -> tuple[float, float]:
    """(synthval, reference) images per second on one thread: decode, flip, to float."""
    torch.set_num_threads(1)
    index = load_dataset(annotation_file, format="coco")
    space = LabelSpace.from_index(index)
    ours = DetectionDataset(index, space.class_ids(index), train=True, hflip_prob=0.5)
    transforms = None
    if references:
        sys.path.insert(0, os.path.join(references, "references", "detection"))
        import presets  # the reference's own

        transforms = presets.DetectionPresetTrain(data_augmentation="hflip")
    theirs = ReferencePipeline(annotation_file, transforms)
    return _rate(ours, seconds), _rate(theirs, seconds)


def _rate(dataset, seconds: float) -> float:
    dataset[0]  # file cache warm for both
    n, start = 0, time.perf_counter()
    while True:
        dataset[n % len(dataset)]
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return n / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", default="800x1333", help="HxW of the images (default 800x1333)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (the reference's default, 2)")
    parser.add_argument("--iterations", type=int, default=60, help="optimizer steps per trainer")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (the reference's default, 4)")
    parser.add_argument("--pipeline-seconds", type=float, default=10.0, help="timed seconds per input pipeline")
    parser.add_argument("--torchvision-references", default=None, metavar="PATH",
                        help="a torchvision source checkout: run its references/detection/train.py as the reference")
    parser.add_argument("--reference-arg", action="append", default=[], help="extra argument for the real reference")
    parser.add_argument("--toy", action="store_true", help="96x128 images, batch 2, 3 steps, no workers (CPU, CI)")
    parser.add_argument("--work-dir", default=None, help="where the images go (default: a temporary folder)")
    args = parser.parse_args()
    if args.toy:
        args.image_size, args.batch, args.iterations, args.workers, args.pipeline_seconds = "96x128", 2, 3, 0, 1.0
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    args.min_size, args.max_size = min(height, width), max(height, width)
    device = distributed.resolve_device(args.device)
    work = args.work_dir or tempfile.mkdtemp(prefix="synthval-bench-train-")
    annotation_file = write_coco(os.path.join(work, "coco"), args.iterations * args.batch, height, width)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    bf16 = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else None
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"images {height}x{width} JPEG, batch {args.batch}, {args.iterations} steps, {args.workers} workers")
    rows: list[tuple[str, float]] = []
    if args.torchvision_references:
        reference_name = "torchvision references/detection/train.py" + (" --amp" if device.type == "cuda" else "")
        reference = run_real_reference(args.torchvision_references, os.path.join(work, "coco"), args, device, work)
    else:
        reference_name = "reference behaviour (PIL, SGD" + (", fp16 autocast + GradScaler)" if device.type == "cuda"
                                                            else ", fp32: no fp16 autocast on CPU)")
        reference = run_reference_loop(annotation_file, args, device)
    rows.append((reference_name, reference))
    rows.append(("synthval seed-synthetic, fp32", run_synthval(annotation_file, args, device, None)))
    if bf16 is not None:
        rows.append(("synthval seed-synthetic, bf16 autocast", run_synthval(annotation_file, args, device, bf16)))
    print(f"\ntraining ResNet-50-FPN at {args.min_size}x{args.max_size}")
    print(f"{'trainer':<58} {'img/s':>9} {'vs reference':>13}")
    for label, rate in rows:
        print(f"{label:<58} {rate:>9.2f} {rate / reference:>12.2f}x")

    ours, theirs = pipeline_rates(annotation_file, args.torchvision_references, args.pipeline_seconds)
    source = "its presets.py" if args.torchvision_references else "PIL, hflip, PILToTensor, float"
    print(f"\ninput pipeline at {height}x{width}, one CPU core (decode, flip, to float)")
    print(f"{'pipeline':<58} {'img/s':>9} {'vs reference':>13}")
    print(f"{'reference (' + source + ')':<58} {theirs:>9.2f} {1.0:>12.2f}x")
    print(f"{'synthval DetectionDataset':<58} {ours:>9.2f} {ours / theirs:>12.2f}x")
    print(f"\nimages in {work}")


if __name__ == "__main__":
    main()
