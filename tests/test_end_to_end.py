"""The whole CLI chain on CPU, as the DAGs run it: generate -> train -> finetune -> evaluate -> publish.

Each step runs as its own `synthval` process, exactly like a pod or the local backend, and hands the
next one URIs through its XCom file.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SYNTHVAL = [sys.executable, "-m", "synthval.cli"]
TINY = ["--preset", "cpu-demo", "--set", "model.min_size=96", "--set", "model.max_size=96",
        "--set", "data.batch_size=4"]
METRIC_KEYS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "mAR1", "mAR10", "mAR100",
               "mean-average-precision", "mean-average-precision-iou50", "mean-average-recall")


def synthval(*args: str, xcom: Path, check: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*SYNTHVAL, *args, "--xcom-file", str(xcom)], capture_output=True, text=True,
                          env=env, check=False, timeout=600)
    if check:
        assert proc.returncode == 0, f"synthval {args[0]} failed:\n{proc.stderr[-3000:]}"
        return json.loads(xcom.read_text())
    return {"returncode": proc.returncode, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic = synthval("generate", "--kind", "synthetic", "--out", str(root / "synthetic"),
                         "--num-images", "16", "--image-size", "96", xcom=root / "g1.json")
    real = synthval("generate", "--kind", "real-proxy", "--out", str(root / "real"),
                    "--num-images", "30", "--image-size", "96", "--seed", "1", xcom=root / "g2.json")
    return synthetic["dataset_uri"], real["dataset_uri"]


def test_train_finetune_evaluate_publish(data, tmp_path):
    synthetic_uri, real_uri = data
    run = tmp_path / "run"
    train = synthval("train", "--train-data", synthetic_uri, "--checkpoint-dir", str(run / "ckpt-synthetic"),
                     "--tb-log-dir", str(run / "tb" / "train"), *TINY, "--set", "max_steps=3",
                     xcom=run / "train.json")
    assert Path(train["checkpoint_uri"]).is_file()
    finetune = synthval("finetune", "--train-data", real_uri, "--train-split", "train", "--max-images", "8",
                        "--init-checkpoint", train["checkpoint_uri"], "--checkpoint-dir", str(run / "ckpt-finetune"),
                        "--tb-log-dir", str(run / "tb" / "finetune"), *TINY, "--set", "max_steps=2",
                        xcom=run / "finetune.json")
    assert finetune["checkpoint_uri"] != train["checkpoint_uri"]
    evaluate = synthval("evaluate", "--checkpoint", finetune["checkpoint_uri"], "--data", real_uri,
                        "--split", "test", "--out", str(run / "eval"), "--tb-log-dir", str(run / "tb" / "eval"),
                        xcom=run / "evaluate.json")
    metrics = json.loads(Path(evaluate["metrics_uri"]).read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert Path(evaluate["predictions_uri"]).is_file()
    assert any((run / "tb" / "eval").rglob("events.out.tfevents.*"))
    assert any((run / "tb" / "train").rglob("events.out.tfevents.*"))
    publish = synthval("publish", "--metrics", evaluate["metrics_uri"], "--results", str(run / "results"),
                       "--recipe", "train_on_synthetic_and_real_dataset", "--run-id", "manual__1",
                       "--dataset", f"synthetic={synthetic_uri}", "--dataset", f"real={real_uri}",
                       "--checkpoint", finetune["checkpoint_uri"], "--real-budget", "8",
                       xcom=run / "publish.json")
    record = json.loads(Path(publish["result_uri"]).read_text())
    assert record["recipe"] == "train_on_synthetic_and_real_dataset"
    assert record["real_budget"] == 8


def test_killed_training_resumes_to_the_same_step_count(data, tmp_path):
    synthetic_uri, _ = data
    ckpt = tmp_path / "ckpt"
    args = ["train", "--train-data", synthetic_uri, "--checkpoint-dir", str(ckpt), "--tb-log-dir",
            str(tmp_path / "tb"), *TINY, "--set", "max_steps=8", "--set", "checkpoint_every_steps=2",
            "--xcom-file", str(tmp_path / "x.json")]
    proc = subprocess.Popen([*SYNTHVAL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(ckpt.glob("checkpoint-*.pt")) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # what a preempted node or an OOM-killed pod does
    proc.wait()
    saved = sorted(ckpt.glob("checkpoint-*.pt"))
    assert saved, "training never wrote a checkpoint before it was killed"
    assert not (tmp_path / "x.json").exists()
    result = synthval(*args[:-2], xcom=tmp_path / "x.json")
    assert result["steps"] == 8
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob(".*.tmp"))
