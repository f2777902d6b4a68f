"""What the demo data show about the domain gap: synthetic-only, real-only and synthetic + fine-tuning,
for three recipes: the fast cpu-demo one, the seed's, and torchvision's modern one.

Generates the demo's data (400 synthetic images, 300 real-proxy images, 192 px; NOT real data), then
trains and scores each model on the real-proxy test split:

- synthetic only;
- real only, on train_small (and train_medium, cpu-demo only: time) from scratch;
- synthetic, then fine-tuned on the same real budgets (`synthval finetune`: the preset's fine-tuning variant).

Recipes: `cpu-demo` as the demo runs it; `seed` (seed-synthetic to train, seed-real for real only, the
seed's fine-tuning recipe) and `modern` (torchvision's reference recipe) at TOY size on the CPU: their
optimiser, learning rate, schedule, augmentation, validation split and epochs (capped at 10 synthetic /
20 real) on the demo's tiny model at 192 px from a random init (no ImageNet weights here), 8 images per
step (modern's lr scaled linearly from 0.02 at 16, torchvision's rule). On a GPU with the ImageNet file in
the torch cache, `--full` runs them as they are (ResNet-50-FPN, 800 px, their own batches and epochs).

On real data (the seed's SynthDet / GroceriesReal results) real-only models on a few real images lag
far behind, and synthetic + fine-tuning beats both; this prints whether the demo data behave so.
About 25 minutes on 2 CPU cores. Usage: python benchmarks/bench_domain_gap.py [--recipes cpu-demo,seed,modern]
[--full] [WORKDIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTHVAL = [sys.executable, "-m", "synthval.cli"]


def synthval(*args: str, work: Path, name: str) -> dict:
    xcom = work / f"{name}.json"
    subprocess.run([*SYNTHVAL, *args, "--xcom-file", str(xcom), "--log-level", "WARNING"], check=True)
    return json.loads(xcom.read_text())


def score(checkpoint_uri: str, real: str, work: Path, name: str) -> dict:
    result = synthval("evaluate", "--checkpoint", checkpoint_uri, "--data", real, "--out", str(work / "eval" / name),
                      work=work, name=f"eval-{name}")
    return result["summary"]


# The demo's tiny model, 192 px, random init, 8 images a step: what a CPU trains in minutes.
TOY = ["--set", "model.name=tiny", "--set", "model.weights_backbone=null", "--set", "model.backbone_norm=batch",
       "--set", "model.min_size=192", "--set", "model.max_size=192", "--set", "model.roi_pool_size=5",
       "--set", "model.box_head_dim=256", "--set", "model.box_batch_size_per_image=64",
       "--set", "data.batch_size=8", "--set", "data.effective_batch_size=8", "--set", "data.num_workers=0"]
# recipe -> step -> (preset, extra flags, toy-only flags)
RECIPES: dict[str, dict[str, tuple[str, list[str], list[str]]]] = {
    "cpu-demo": {"synthetic": ("cpu-demo", [], []), "real": ("cpu-demo", ["--set", "epochs=20"], []),
                 "finetune": ("cpu-demo", [], [])},
    "seed": {"synthetic": ("seed-synthetic", [], ["--set", "epochs=10"]),
             "real": ("seed-real", [], ["--set", "epochs=20"]),
             "finetune": ("seed-synthetic", [], ["--set", "epochs=20"])},
    "modern": {"synthetic": ("modern", [], ["--set", "epochs=10", "--set", "optimizer.lr=0.01"]),
               "real": ("modern", [], ["--set", "epochs=20", "--set", "optimizer.lr=0.01"]),
               "finetune": ("modern", [], ["--set", "epochs=20", "--set", "optimizer.lr=0.001"])},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", nargs="?", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--recipes", default="cpu-demo,seed,modern")
    parser.add_argument("--full", action="store_true", help="seed and modern as they are (GPU, ImageNet file)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="synthval-gap-"))
    work.mkdir(parents=True, exist_ok=True)
    syn = synthval("generate", "--kind", "synthetic", "--out", str(work / "syn"), "--num-images", "400",
                   "--image-size", "192", work=work, name="gen-syn")["dataset_uri"]
    real = synthval("generate", "--kind", "real-proxy", "--out", str(work / "real"), "--num-images", "300",
                    "--image-size", "192", "--seed", "1", work=work, name="gen-real")["dataset_uri"]
    rows: list[tuple[str, str, int, dict, float]] = []

    for recipe in args.recipes.split(","):
        steps = RECIPES[recipe]

        def train(step: str, kind: str, data: str, name: str, *extra: str) -> tuple[str, float]:
            preset, flags, toy = steps[kind]
            if recipe != "cpu-demo" and not args.full:
                flags = [*TOY, *toy, *flags]
            t0 = time.perf_counter()
            out = synthval(step, "--train-data", data, "--checkpoint-dir", str(work / recipe / "ckpt" / name),
                           "--tb-log-dir", str(work / recipe / "tb" / name), "--preset", preset, *flags, *extra,
                           work=work, name=f"{recipe}-{name}")
            return out["checkpoint_uri"], time.perf_counter() - t0

        def evaluate(checkpoint: str, name: str) -> dict:
            return score(checkpoint, real, work, f"{recipe}-{name}")

        # The seed and modern recipes validate on the synthetic seed-val split, as the DAGs do.
        validate = [] if recipe == "cpu-demo" else ["--val-data", syn, "--train-split", "seed-train",
                                                    "--val-split", "seed-val"]
        synthetic, seconds = train("train", "synthetic", syn, "synthetic", *validate)
        rows.append((recipe, "synthetic only", 0, evaluate(synthetic, "synthetic"), seconds))
        for split in ("train_small", "train_medium") if recipe == "cpu-demo" else ("train_small",):
            budget = len((Path(real) / f"groceries_real_{split}.txt").read_text().split())
            real_val = [] if recipe == "cpu-demo" else ["--val-data", real]
            ckpt, seconds = train("train", "real", real, f"real-{split}", "--train-split", split, *real_val)
            rows.append((recipe, f"real only ({split})", budget, evaluate(ckpt, f"real-{split}"), seconds))
            ckpt, seconds = train("finetune", "finetune", real, f"finetune-{split}", "--train-split", split,
                                  "--init-checkpoint", synthetic, *real_val)
            rows.append((recipe, f"synthetic + fine-tune ({split})", budget, evaluate(ckpt, f"ft-{split}"), seconds))

    size = "as they are" if args.full else "seed and modern at TOY size (tiny model, 192 px, random init)"
    print(f"\nreal-proxy test split (generated data, NOT real images); {size}; work dir {work}")
    print(f"{'recipe':10s}{'model':34s}{'real imgs':>10s}{'mAP':>8s}{'mAP50':>8s}{'mAR100':>8s}{'train s':>9s}")
    for recipe, name, budget, summary, seconds in rows:
        print(f"{recipe:10s}{name:34s}{budget:>10d}{summary['mAP']:>8.3f}{summary['mAP50']:>8.3f}"
              f"{summary['mAR100']:>8.3f}{seconds:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
