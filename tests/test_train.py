"""run_train end to end on tiny COCO sets drawn here: checkpoints, resume, fine-tuning, divergence."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from synthval.detection import randomness
from synthval.steps import train as train_module
from synthval.detection.checkpoint import FORMAT, list_checkpoints, load_checkpoint
from synthval.cli import main
from synthval.config import TrainConfig, load_config
from synthval.errors import CheckpointError, TrainingDivergedError
from synthval.steps.train import run_train

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 220, 40)}
TINY = ["model.min_size=96", "model.max_size=128", "data.batch_size=4", "log_every_steps=1"]


def make_coco(root, names, n, size=96, seed=0):
    """A COCO folder (annotations/instances.json beside images/) of coloured squares on grey; ids from 10."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images")
    os.makedirs(root / "annotations")
    images, annotations = [], []
    for i in range(n):
        width = size + (size // 4 if i % 3 == 0 else 0)  # two aspect ratios, for the grouping
        image = Image.new("RGB", (width, size), tuple(int(v) for v in rng.integers(60, 120, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            k, s = int(rng.integers(len(names))), int(rng.integers(size // 6, size // 3))
            x, y = int(rng.integers(0, width - s)), int(rng.integers(0, size - s))
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[names[k]])
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 10 + k,
                                "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
        image.save(root / "images" / f"img_{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"img_{i:03d}.png", "width": width, "height": size})
    categories = [{"id": 10 + k, "name": name} for k, name in enumerate(names)]
    (root / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"rgb": make_coco(root / "rgb", ["red", "green", "blue"], 30),
            "gby": make_coco(root / "gby", ["green", "blue", "yellow"], 20, seed=1)}


def config(*overrides):
    return load_config(TrainConfig, preset="cpu-demo", overrides=[*TINY, *overrides])


def train(cfg, data_uri, run_dir, name, **kwargs):
    kwargs.setdefault("val_data_uri", None)
    kwargs.setdefault("init_checkpoint_uri", None)
    return run_train(cfg, train_data_uri=data_uri, checkpoint_dir_uri=str(run_dir / name / "ckpt"),
                     tb_log_dir_uri=str(run_dir / name / "tb"), **kwargs)


class Interrupted(Exception):
    pass


def watch_steps(monkeypatch):
    """Record every global step the engine trains into `seen`; with control["stop_after"] = n, raise
    Interrupted after n recorded steps, as a killed pod stops (after the step, before anything else)."""
    seen, control = [], {"stop_after": None}
    real = train_module.train_one_epoch

    def wrapped(*args, on_step=None, **kwargs):
        def hook(info):
            seen.append(info["global_step"])
            on_step(info)
            if control["stop_after"] is not None and len(seen) >= control["stop_after"]:
                raise Interrupted(f"killed after step {info['global_step']}")

        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", wrapped)
    return seen, control


def test_train_writes_checkpoints_tensorboard_and_a_small_result(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(config("max_steps=3", "epochs=1"), data["rgb"], tmp_path, "run", val_data_uri=data["gby"])
    assert result["steps"] == 3 and result["epochs"] == 1
    assert result["checkpoint_uri"] == str(tmp_path / "run" / "ckpt" / "checkpoint-3.pt")
    assert result["images_per_second"] > 0 and set(result["val_metrics"]) == {"loss", "mAP", "mAP50"}
    assert result["val_metrics"]["loss"] > 0
    assert result["best_checkpoint_uri"] == str(tmp_path / "run" / "ckpt" / "best.pt")
    assert result["best_val_metrics"] == {"mAP": result["val_metrics"]["mAP"], "step": 3}
    assert len(json.dumps(result)) < 1000

    state = load_checkpoint(result["checkpoint_uri"])
    assert state["format"] == FORMAT and state["format_version"] >= 1 and state["synthval_version"]
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "epoch_step", "step", "rng", "config",
            "label_names", "metrics", "best", "batches_per_step"} <= set(state)
    assert state["step"] == 3 and state["finished"] is True
    assert state["label_names"] == ["red", "green", "blue"]
    assert state["config"]["model"]["name"] == "tiny" and state["config"]["max_steps"] == 3
    assert len(state["rng"]["ranks"]) == 1 and {"torch", "numpy", "python"} <= set(state["rng"]["ranks"][0])
    assert 0.0 <= state["metrics"]["mAP50"] <= 1.0 and state["metrics"]["loss"] > 0
    best = load_checkpoint(result["best_checkpoint_uri"])  # the best beside the last, a whole checkpoint
    assert best["step"] == 3 and all(torch.equal(best["model"][k], v) for k, v in state["model"].items())

    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    # Validation shows the pictures evaluation and the run report show.
    assert {"val/per_class_AP", "val/pr_curves", "val/worst/0", "val/best/0"} <= set(events.Tags()["images"])
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_classifier", "train/lr", "train/images_per_second", "val/mAP",
            "val/mAP50", "val/loss", "val/loss_classifier", "val/loss_objectness"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_killed_run_resumes_from_its_checkpoint_to_the_same_step_count(data, tmp_path, monkeypatch, caplog):
    # 24 training images in batches of 4: about 6 steps per epoch, so 8 steps cross an epoch boundary
    cfg = ["max_steps=8", "checkpoint_every_steps=2", "keep_checkpoints=0"]
    whole = train(config(*cfg), data["rgb"], tmp_path, "whole", resume="none")

    seen, control = watch_steps(monkeypatch)
    control["stop_after"] = 5
    with pytest.raises(Interrupted):
        train(config(*cfg), data["rgb"], tmp_path, "cut")
    assert seen == [1, 2, 3, 4, 5]
    assert [s for s, _ in list_checkpoints(str(tmp_path / "cut" / "ckpt"))] == [2, 4]
    assert load_checkpoint(str(tmp_path / "cut" / "ckpt" / "checkpoint-4.pt"))["epoch_step"] == 4  # mid-epoch

    seen.clear()
    control["stop_after"] = None
    with caplog.at_level(logging.INFO, logger="synthval"):
        resumed = train(config(*cfg), data["rgb"], tmp_path, "cut")  # resume="auto"
    assert "resuming from" in caplog.text and "checkpoint-4.pt" in caplog.text
    assert seen == [5, 6, 7, 8]  # continued from the saved step, trained each remaining step once
    assert resumed["steps"] == whole["steps"] == 8 and resumed["epochs"] == whole["epochs"]
    assert resumed["checkpoint_uri"].endswith("checkpoint-8.pt")

    seen.clear()
    again = train(config(*cfg), data["rgb"], tmp_path, "cut")  # a retry after success trains nothing
    assert seen == [] and again["checkpoint_uri"] == resumed["checkpoint_uri"] and again["steps"] == 8

    with pytest.raises(CheckpointError, match="other labels"):  # a checkpoint dir of another run
        run_train(config(*cfg), data["gby"], None, None, str(tmp_path / "cut" / "ckpt"), str(tmp_path / "tb2"))


def test_finetune_maps_the_head_by_label_name(data, tmp_path, caplog):
    first = train(config("max_steps=2"), data["rgb"], tmp_path, "synthetic")
    with caplog.at_level(logging.INFO, logger="synthval"):
        tuned = train(config("max_steps=2", "optimizer.lr=0.0005"), data["gby"], tmp_path, "finetune",
                      init_checkpoint_uri=first["checkpoint_uri"])
    assert "2 kept (green, blue)" in caplog.text and "1 new" in caplog.text and "yellow" in caplog.text
    assert "dropped (red)" in caplog.text
    state = load_checkpoint(tuned["checkpoint_uri"])
    assert state["label_names"] == ["green", "blue", "yellow"] and state["step"] == 2
    assert state["config"]["optimizer"]["lr"] == 0.0005  # the fine-tune config's own schedule


def test_a_diverging_run_stops_with_a_clear_error(data, tmp_path):
    cfg = config("optimizer.name=sgd", "optimizer.lr=1.0e+30", "schedule.warmup_steps=0", "max_steps=6")
    with pytest.raises(TrainingDivergedError) as err:
        train(cfg, data["rgb"], tmp_path, "nan")
    message = str(err.value)
    assert "step" in message and "loss_classifier=" in message and "optimizer.lr" in message
    assert not list_checkpoints(str(tmp_path / "nan" / "ckpt"))


def test_unknown_key_in_a_config_file_exits_2_naming_it(data, tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("model:\n  name: tiny\n  roi_pool_sise: 5\n")
    code = main(["train", "--train-data", data["rgb"], "--checkpoint-dir", str(tmp_path / "c"), "--tb-log-dir",
                 str(tmp_path / "tb"), "--config", str(tmp_path / "train.yaml"), "--xcom-file", str(tmp_path / "x")])
    assert code == 2
    assert "model.roi_pool_sise" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


def test_tensorboard_to_a_remote_uri_uploads_whole_event_files():
    import fsspec
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from synthval.render.tensorboard import open_summary_writer

    uri = f"memory://tb-{os.getpid()}/run"
    writer = open_summary_writer(uri)
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.flush()
    writer.add_scalar("train/loss", 0.1, 3)
    writer.close()
    fs = fsspec.filesystem("memory")
    files = fs.glob(f"/tb-{os.getpid()}/run/events.out.tfevents.*")
    assert len(files) == 1
    local = fs.cat_file(files[0])
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"synthval-test-events-{os.getpid()}")
    with open(path, "wb") as f:
        f.write(local)
    try:
        steps = [e.step for e in EventFileLoader(path).Load() if e.summary.value]
    finally:
        os.unlink(path)
    assert steps == [0, 1, 2, 3]


def torchrun_train(data_uri, root, *overrides, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "synthval.cli", "train", "--train-data", data_uri, "--checkpoint-dir", str(root / "ckpt"),
               "--tb-log-dir", str(root / "tb"), "--preset", "cpu-demo", "--xcom-file", str(root / "x.json"),
               *[a for kv in [*TINY, *overrides] for a in ("--set", kv)]]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "x.json").read_text()), proc.stderr


@pytest.mark.slow
def test_two_processes_with_torchrun_train_as_one_and_resume_exactly(data, tmp_path):
    # Batches of 2 per process, flips and jitter on, a schedule that does not depend on the run's length:
    # 15 batches a pass, so 7 steps an epoch and a stop after 3 steps is mid-epoch.
    common = ["data.batch_size=2", "data.hflip_prob=0.5", "data.photometric=true", "schedule.name=constant",
              "schedule.warmup_steps=0"]
    whole, stderr = torchrun_train(data["rgb"], tmp_path / "whole", *common, "max_steps=5")
    assert whole["steps"] == 5 and stderr.count("training done") == 1  # only rank 0 logs
    state = load_checkpoint(whole["checkpoint_uri"])
    assert state["world_size"] == 2 and state["batches_per_step"] == 2
    first, second = state["rng"]["ranks"]  # each process's own stream, saved and restored per rank
    assert not torch.equal(first["torch"], second["torch"])

    cut, _ = torchrun_train(data["rgb"], tmp_path / "cut", *common, "max_steps=3")
    assert load_checkpoint(cut["checkpoint_uri"])["epoch_step"] == 3
    resumed, stderr = torchrun_train(data["rgb"], tmp_path / "cut", *common, "max_steps=5")
    assert "resuming from" in stderr and resumed["steps"] == 5
    again = load_checkpoint(resumed["checkpoint_uri"])
    for key in ("model", "optimizer", "rng", "epoch", "epoch_step"):
        assert_same_state(state[key], again[key], key)


def _shard_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from synthval.data.torch_dataset import GroupedBatchSampler

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = GroupedBatchSampler(np.arange(30) % 3 == 0, batch_size=2, seed=5)
        batches = {epoch: [list(b) for b in randomness.EpochBatches(sampler, epoch, per_epoch=14, skip=skip)]
                   for epoch, skip in ((0, 0), (1, 4))}
        randomness.seed_process(randomness.stream_seed(0, 0, rank))
        draws = torch.rand(4).tolist()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"batches": batches, "draws": draws}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_of_two_gloo_processes_trains_its_own_batches_with_its_own_random_stream(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    sampler = __import__("synthval.data.torch_dataset", fromlist=["x"]).GroupedBatchSampler(
        np.arange(30) % 3 == 0, batch_size=2, seed=5)
    for epoch, skip in (("0", 0), ("1", 4)):
        sampler.set_epoch(int(epoch))
        order = [list(b) for b in sampler][skip:14]  # the pass's batches after `skip`, whole steps only
        mine = [r["batches"][epoch] for r in ranks]
        assert mine[0] == order[0::2] and mine[1] == order[1::2]  # batch i to process i % 2
        images = [{i for b in m for i in b} for m in mine]
        assert not images[0] & images[1]  # disjoint shards
    assert ranks[0]["draws"] != ranks[1]["draws"]


def assert_same_state(a, b, where=""):
    """Two checkpoint values equal bit for bit: tensors by torch.equal, containers item by item."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# 30 images in two aspect ratios, batches of 4 (8 a pass), 2 batches per step: 4 steps an epoch, 10 in all.
# Flips and colour jitter on, validation every epoch: every random stream the run has is in play.
RESUME = ["max_steps=10", "checkpoint_every_steps=3", "keep_checkpoints=0", "grad_accum_steps=2",
          "data.hflip_prob=0.5", "data.photometric=true", "schedule.name=cosine", "schedule.warmup_steps=2"]


@pytest.mark.parametrize("stop_after, resumed_from, workers", [(5, 4, 0), (7, 6, 2)],
                         ids=["at-an-epoch-end", "mid-epoch-with-2-workers"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights_and_optimizer_state(
        data, tmp_path, monkeypatch, stop_after, resumed_from, workers):
    cfg = config(*RESUME, f"data.num_workers={workers}")
    whole = train(cfg, data["rgb"], tmp_path, "whole", val_data_uri=data["gby"], resume="none")

    seen, control = watch_steps(monkeypatch)
    control["stop_after"] = stop_after
    with pytest.raises(Interrupted):
        train(config(*RESUME, f"data.num_workers={workers}"), data["rgb"], tmp_path, "cut", val_data_uri=data["gby"])
    latest = load_checkpoint(str(tmp_path / "cut" / "ckpt" / f"checkpoint-{resumed_from}.pt"))
    assert latest["epoch_step"] == (0 if resumed_from == 4 else 2)  # at the start of epoch 1, or 2 steps in
    assert not (tmp_path / "cut" / "ckpt" / f"checkpoint-{stop_after}.pt").exists()

    seen.clear()
    control["stop_after"] = None
    resumed = train(config(*RESUME, f"data.num_workers={workers}"), data["rgb"], tmp_path, "cut",
                    val_data_uri=data["gby"])
    assert seen == list(range(resumed_from + 1, 11))
    a, b = load_checkpoint(whole["checkpoint_uri"]), load_checkpoint(resumed["checkpoint_uri"])
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "epoch_step", "step", "metrics", "best"):
        assert_same_state(a[key], b[key], key)
    assert resumed["val_metrics"] == whole["val_metrics"]


def test_resume_restores_what_it_must(data, tmp_path, monkeypatch):
    """The same comparison fails when a piece of state is not restored: the test above can tell."""
    cfg = config(*RESUME)
    whole = load_checkpoint(train(cfg, data["rgb"], tmp_path, "whole", resume="none")["checkpoint_uri"])
    real_restore = randomness.restore_rng

    def run_cut(name, **patches):
        seen, control = watch_steps(monkeypatch)
        control["stop_after"] = 7
        with pytest.raises(Interrupted):
            train(config(*RESUME), data["rgb"], tmp_path, name)
        control["stop_after"] = None
        with monkeypatch.context() as m:
            for attr, value in patches.items():
                m.setattr(randomness, attr, value)
            return load_checkpoint(train(config(*RESUME), data["rgb"], tmp_path, name)["checkpoint_uri"])

    without_rng = run_cut("no-rng", restore_rng=lambda state: None)
    assert not torch.equal(without_rng["model"]["roi_heads.box_head.fc6.weight"],
                           whole["model"]["roi_heads.box_head.fc6.weight"])
    assert real_restore is randomness.restore_rng


def cli_train(data_uri, root, *args):
    return main(["train", "--train-data", data_uri, "--checkpoint-dir", str(root / "ckpt"), "--tb-log-dir",
                 str(root / "tb"), "--xcom-file", str(root / "xcom.json"), "--preset", "cpu-demo",
                 *[a for kv in TINY for a in ("--set", kv)], "--set", "max_steps=1", *args])


def coco_with_categories(root, categories):
    make_coco(root, ["red", "green", "blue"], 4)
    doc = json.loads((root / "annotations" / "instances.json").read_text())
    doc["categories"] = categories
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    return str(root)


@pytest.mark.parametrize("case", ["nan", "inf", "probability", "effective-batch", "repeated-label-id",
                                  "repeated-label-name", "blank-label", "missing-init", "missing-imagenet"])
def test_bad_input_exits_2_naming_it_before_anything_is_written(case, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-cache"))
    train_data, extra, named = data["rgb"], [], None
    cats = [{"id": 10, "name": "red"}, {"id": 11, "name": "green"}, {"id": 12, "name": "blue"}]
    if case == "nan":
        extra, named = ["--set", "optimizer.lr=.nan"], "optimizer.lr: nan is not a finite number"
    elif case == "inf":
        extra, named = ["--set", "schedule.warmup_factor=1e999"], "schedule.warmup_factor: inf"
    elif case == "probability":
        extra, named = ["--set", "data.hflip_prob=1.5"], "data.hflip_prob: 1.5 must be between 0 and 1"
    elif case == "effective-batch":
        extra, named = ["--set", "data.effective_batch_size=6"], "effective_batch_size=6 is not a whole multiple"
    elif case.startswith("repeated") or case == "blank-label":
        cats[2] = {"id": 11 if case == "repeated-label-id" else 12,
                   "name": {"repeated-label-name": "red", "blank-label": "  "}.get(case, "blue")}
        train_data = coco_with_categories(tmp_path / "bad-data", cats)
        named = {"repeated-label-id": "instances.json: categories[2]: label id 11 ('blue') is listed twice",
                 "repeated-label-name": "instances.json: categories[2]: label name 'red' is listed twice",
                 "blank-label": "instances.json: categories[2]: label id 12 has a blank name"}[case]
    elif case == "missing-init":
        extra, named = ["--init-checkpoint", str(tmp_path / "nope.pt")], "nope.pt: no such checkpoint file"
    else:
        extra = ["--set", "model.name=resnet50_fpn", "--set", "model.weights_backbone=imagenet"]
        named = str(tmp_path / "no-torch-cache" / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    run = tmp_path / "run"
    assert cli_train(train_data, run, *extra) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not run.exists()  # no checkpoint folder, no TensorBoard events, no XCom


def test_a_second_training_on_a_folder_is_refused_naming_the_first_and_a_dead_one_s_lock_is_taken_over(
        data, tmp_path, capsys, caplog):
    import signal
    import time

    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    in_flight = run / "ckpt" / ".checkpoint-7.pt.x1y2z3.tmp"  # the holder is writing its step 7
    in_flight.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom synthval.detection.checkpoint import CheckpointDirLock\n"
         "CheckpointDirLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n", str(run / "ckpt")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_train(data["rgb"], run) == 2
        err = capsys.readouterr().err
        assert f"another training is writing to this checkpoint folder (pid {holder.pid} on host" in err
        assert in_flight.read_bytes() == b"half a checkpoint"  # its write is untouched
        assert not (run / "tb").exists() and not list_checkpoints(str(run / "ckpt"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    assert (run / "ckpt" / ".synthval-train.lock").exists()  # a killed process leaves its lock file
    with caplog.at_level(logging.WARNING, logger="synthval"):
        assert cli_train(data["rgb"], run) == 0
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert not in_flight.exists()  # a dead writer's leftover is cleaned up once the folder is ours
    assert not (run / "ckpt" / ".synthval-train.lock").exists()
    assert [s for s, _ in list_checkpoints(str(run / "ckpt"))] == [1]
