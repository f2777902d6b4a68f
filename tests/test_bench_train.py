"""benchmarks/bench_train.py runs at toy size on a CPU and prints each trainer's rate and its ratio to the
reference, and both input pipelines' rates per core (the figures themselves are for a GPU; see README)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_bench_train_runs_at_toy_size_and_prints_rates_and_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--device", "cpu", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = dict(re.findall(r"^(reference behaviour.*?|synthval seed-synthetic, \S+(?: autocast)?)\s+([\d.]+)\s+[\d.]+x$",
                           out, re.M))
    assert len(rows) == 3 and all(float(v) > 0 for v in rows.values()), out
    assert re.search(r"^reference \(PIL, hflip, PILToTensor, float\)\s+[\d.]+\s+1\.00x$", out, re.M), out
    assert re.search(r"^synthval DetectionDataset\s+[\d.]+\s+[\d.]+x$", out, re.M), out
    assert len(list((tmp_path / "coco" / "images").glob("*.jpg"))) == 6  # 3 steps of 2 images, each read once
