"""What the demo data show about the domain gap: synthetic-only, real-only and synthetic + fine-tuning.

Generates the demo's data (400 synthetic images, 300 real-proxy images, 192 px; NOT real data), then
trains with the cpu-demo preset and scores each model on the real-proxy test split:

- synthetic only;
- real only, on train_small and train_medium (from scratch);
- synthetic, then fine-tuned on the same real budgets (`synthval finetune`'s own step size).

On real data (the seed's SynthDet / GroceriesReal results) real-only models on a few real images lag
far behind, and synthetic + fine-tuning beats both; this prints whether the demo data behave so.
About 8 minutes on 2 CPU cores. Usage: python benchmarks/bench_domain_gap.py [WORKDIR]
"""

from __future__ import annotations

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


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="synthval-gap-"))
    work.mkdir(parents=True, exist_ok=True)
    syn = synthval("generate", "--kind", "synthetic", "--out", str(work / "syn"), "--num-images", "400",
                   "--image-size", "192", work=work, name="gen-syn")["dataset_uri"]
    real = synthval("generate", "--kind", "real-proxy", "--out", str(work / "real"), "--num-images", "300",
                    "--image-size", "192", "--seed", "1", work=work, name="gen-real")["dataset_uri"]
    rows: list[tuple[str, int, dict, float]] = []

    def train(step: str, data: str, name: str, *extra: str) -> tuple[str, float]:
        t0 = time.perf_counter()
        out = synthval(step, "--train-data", data, "--checkpoint-dir", str(work / "ckpt" / name),
                       "--tb-log-dir", str(work / "tb" / name), "--preset", "cpu-demo", *extra, work=work, name=name)
        return out["checkpoint_uri"], time.perf_counter() - t0

    synthetic, seconds = train("train", syn, "synthetic")
    rows.append(("synthetic only", 0, score(synthetic, real, work, "synthetic"), seconds))
    for split in ("train_small", "train_medium"):
        budget = len((Path(real) / f"groceries_real_{split}.txt").read_text().split())
        ckpt, seconds = train("train", real, f"real-{split}", "--train-split", split, "--set", "epochs=20")
        rows.append((f"real only ({split})", budget, score(ckpt, real, work, f"real-{split}"), seconds))
        ckpt, seconds = train("finetune", real, f"finetune-{split}", "--train-split", split,
                              "--init-checkpoint", synthetic)
        rows.append((f"synthetic + fine-tune ({split})", budget, score(ckpt, real, work, f"ft-{split}"), seconds))

    print(f"\nreal-proxy test split, cpu-demo preset (generated data, NOT real images); work dir {work}")
    print(f"{'model':38s}{'real imgs':>10s}{'mAP':>8s}{'mAP50':>8s}{'mAR100':>8s}{'train s':>9s}")
    for name, budget, summary, seconds in rows:
        print(f"{name:38s}{budget:>10d}{summary['mAP']:>8.3f}{summary['mAP50']:>8.3f}{summary['mAR100']:>8.3f}"
              f"{seconds:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
