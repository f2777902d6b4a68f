"""Training on several nodes: what the rendezvous costs (measured), and what a 400k-image run costs in
GPU-hours at each shape (estimated).

Measured here, with the real `synthval train` command lines the backends run (cpu-demo preset, tiny
model, generated data, batch 2 per process, OMP_NUM_THREADS=1 per process, the same effective batch of
4 images per optimizer step everywhere):

- 1 x 1: one process accumulating 2 batches (the baseline);
- 1 x 2: one node, two processes (`torchrun --standalone`, what `gpus: 2` runs today);
- 2 x 1: two "nodes" of one process, two torchrun agents meeting at a c10d rendezvous on 127.0.0.1
  (what each pod of the multi-node Job runs, `launch_command(..., nodes=2)`).

The rate is the group's training images per second the step reports. 2 x 1 against 1 x 2 is the cost
of the rendezvous itself (the same gloo all-reduce over loopback either way); 1 x 2 against 1 x 1 is
how two processes scale on this machine's cores.

Estimated (not measured here: no GPU, one machine): GPU-hours of a 400k-image, 10-epoch run (the seed's
SynthDet recipe) for 1 x 8, 2 x 4, 4 x 2, 8 x 1 and 1 x 1 L4 GPUs. Each shape's efficiency is a step's compute
time over compute plus one all-reduce of the gradients per optimizer step, without overlap (DDP overlaps
part of it with the backward pass, so this errs high). Inputs, each printed with where it comes from:
the trainable parameter count of resnet50_fpn (measured: the model built here), the per-GPU training
rate (assumed; `--gpu-rate`, or measure it with benchmarks/bench_train.py on the GPU node), and the
bandwidth between GPUs inside a node and between nodes (assumed; the machine types' published caps).

    python benchmarks/bench_multinode.py [--steps 30] [--gpu-rate 6.0]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (bench_train.py)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tasks"))
sys.path.insert(0, str(ROOT / "dags"))

from synthval_jobs import NODE_ENV  # noqa: E402
from synthval_launch import Rendezvous, launch_command  # noqa: E402

BATCH = 2
EPOCHS_400K = 10  # the seed's faster_rcnn_synthetic.yaml
IMAGES_400K = 400_000
PER_GPU_BATCH = 4  # the seed's train.batch_size
# GPU shapes of the estimate: (nodes, GPUs per node, GKE machine type, its published network cap in Gbit/s)
SHAPES = [(1, 8, "g2-standard-96", 100), (2, 4, "g2-standard-48", 50), (4, 2, "g2-standard-24", 32),
          (8, 1, "g2-standard-12", 16), (1, 1, "g2-standard-12", 16)]


def synthval(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("synthval")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "synthval.cli", *args]


def train_argv(data: str, out: Path, steps: int) -> list[str]:
    """The train task's command line as a DAG renders it; the accumulation follows from the effective batch."""
    sets = [f"data.batch_size={BATCH}", f"data.effective_batch_size={2 * BATCH}", f"max_steps={steps}",
            "log_every_steps=1000"]
    return ["synthval", "train", f"--train-data={data}", f"--checkpoint-dir={out / 'ckpt'}",
            f"--tb-log-dir={out / 'tb'}", "--resume=none", "--preset=cpu-demo", *[f"--set={kv}" for kv in sets]]


def env(out: Path, node: int = 0) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, **NODE_ENV, OMP_NUM_THREADS="1", SYNTHVAL_XCOM_FILE=str(out / f"result{node}.json"))


def rate(out: Path) -> float:
    results = [json.loads(p.read_text()) for p in out.glob("result*.json")]
    assert len(results) == 1, f"{out}: expected one result, found {len(results)}"
    return float(results[0]["images_per_second"])


def run(cmd: list[str], out: Path) -> float:
    proc = subprocess.run(cmd, env=env(out), capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr[-2000:]}")
    return rate(out)


def run_two_nodes(argv: list[str], out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = launch_command(argv, 1, local=True, nodes=2,
                         rendezvous=Rendezvous(f"127.0.0.1:{port}", "bench", join_timeout_s=300, max_restarts=0))
    procs = []
    for node in (0, 1):
        procs.append(subprocess.Popen(cmd, env=env(out, node), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(2 if node == 0 else 0)  # node 0 hosts the store, as pod 0 does
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"a node failed:\n{err[-2000:]}")
    return rate(out)


def measured_scaling(steps: int, images: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        root = Path(tmp)
        data = str(root / "data")
        subprocess.run(synthval("generate", "--kind", "synthetic", "--out", data, "--num-images", str(images),
                                "--image-size", "192", "--xcom-file", str(root / "gen.json")),
                       check=True, capture_output=True, timeout=1800)
        rates = {}
        rates["1x1"] = run(launch_command(train_argv(data, root / "1x1", steps), 1, local=True), root / "1x1")
        rates["1x2"] = run(launch_command(train_argv(data, root / "1x2", steps), 2, local=True), root / "1x2")
        rates["2x1"] = run_two_nodes(train_argv(data, root / "2x1", steps), root / "2x1")
        return rates


def trainable_parameters() -> int:
    from synthval.config import ModelConfig
    from synthval.detection.model import build_model

    model = build_model(ModelConfig(name="resnet50_fpn"), num_classes=64, load_backbone_weights=False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate(params: int, gpu_rate: float, intra_gbps: float) -> list[dict]:
    grad_bytes = 4 * params  # DDP all-reduces float32 gradients
    compute_s = PER_GPU_BATCH / gpu_rate
    rows = []
    for nodes, gpus, machine, net_gbps in SHAPES:
        world = nodes * gpus
        # Ring all-reduce: each GPU sends and receives 2 (n-1)/n of the gradients over its slowest link.
        intra = 2 * (gpus - 1) / gpus * grad_bytes / (intra_gbps * 1e9 / 8) if gpus > 1 else 0.0
        inter = 2 * (nodes - 1) / nodes * grad_bytes / (net_gbps * 1e9 / 8) if nodes > 1 else 0.0
        efficiency = compute_s / (compute_s + intra + inter)
        gpu_hours = IMAGES_400K * EPOCHS_400K / (gpu_rate * efficiency) / 3600
        rows.append({"shape": f"{nodes} x {gpus}", "machine": machine, "world": world,
                     "allreduce_ms": 1000 * (intra + inter), "efficiency": efficiency, "gpu_hours": gpu_hours,
                     "wall_hours": gpu_hours / world})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measured run")
    parser.add_argument("--images", type=int, default=160, help="generated training images")
    parser.add_argument("--gpu-rate", type=float, default=6.0,
                        help="training images/s of one GPU for resnet50_fpn at 800 px (assumed unless measured)")
    parser.add_argument("--intra-node-gbps", type=float, default=80.0,
                        help="GPU-to-GPU bandwidth inside a node, Gbit/s (assumed: L4s talk over PCIe)")
    args = parser.parse_args()

    print(f"host: {os.cpu_count()} CPUs, torch threads per process 1, batch {BATCH}, {args.steps} steps, "
          f"effective batch {2 * BATCH}")
    rates = measured_scaling(args.steps, args.images)
    print("MEASURED (this machine, CPU, tiny model, images/s of the whole group):")
    for shape, value in rates.items():
        print(f"  {shape}: {value:6.2f} images/s")
    print(f"  1 node x 2 processes / 1 process:      {rates['1x2'] / rates['1x1']:.2f}x")
    print(f"  2 nodes x 1 process / 1 node x 2 (the rendezvous's own cost): {rates['2x1'] / rates['1x2']:.2f}x")

    params = trainable_parameters()
    print(f"MEASURED: resnet50_fpn as synthval.detection.model builds it (64 classes, no pretrained backbone: every layer "
          f"trainable) has {params / 1e6:.1f} M trainable "
          f"parameters, {4 * params / 1e6:.0f} MB of float32 gradients per all-reduce")
    print(f"ASSUMED: {args.gpu_rate:g} images/s per L4 GPU (resnet50_fpn, 800 px, bf16), {PER_GPU_BATCH} images "
          f"per GPU per step, {args.intra_node_gbps:g} Gbit/s between GPUs of a node, network caps of the "
          f"machine types below")
    print(f"ESTIMATED: {IMAGES_400K:,} images x {EPOCHS_400K} epochs "
          f"({IMAGES_400K * EPOCHS_400K / 1e6:.0f} M images trained on)")
    print(f"  {'shape':<7} {'machine':<15} {'all-reduce':>10} {'efficiency':>10} {'GPU-hours':>9} {'wall hours':>10}")
    for row in estimate(params, args.gpu_rate, args.intra_node_gbps):
        print(f"  {row['shape']:<7} {row['machine']:<15} {row['allreduce_ms']:8.0f}ms {row['efficiency']:10.0%} "
              f"{row['gpu_hours']:9.0f} {row['wall_hours']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
