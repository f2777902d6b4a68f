"""Index a 20,000-capture Perception 0.0.1 dataset: synthval's `load_dataset` against the seed's way, against
the index of a baseline revision, and the simulator-metrics pass that `synthval stats` adds.

The seed (datasetinsights' `Captures`) read each captures_*.json, flattened it with
`pandas.json_normalize`, joined captures to their 2D-box annotations and exploded the box values. This
script writes a SynthDet-shaped dataset (captures split over captures_NNN.json files of 150 captures,
as Unity writes them; ~5 boxes per capture; one tiny PNG hard-linked under 20,000 names, so each
capture names its own file as in a real run; and the metrics SynthDet records beside them in
metrics_NNN.json: ObjectCount over all 63 labels, RenderedObjectInfo per object, scenario iteration,
lighting and object placement), then runs each loader in a fresh process and prints wall time (best
of --repeat) and peak memory (tracemalloc peak of a separate run, and the process's peak RSS), and
the ratios.

    python benchmarks/bench_index.py [--captures 20000] [--repeat 3] [--rounds 3] [--keep DIR] [--baseline REV|none]

Loaders: `synthval` (this checkout's index), `baseline` (the same call with `tasks/` of git revision
REV, exported to a temporary folder: by default the merge-base of HEAD and main, i.e. the index before
this branch), `pandas` (the seed's way) and `metrics` (`stats.load_simulator_metrics`, the separate
pass only `synthval stats` runs; indexing never reads a metric).

What is compared: the index loaders produce, per camera capture, the image path, its boxes (xyxy) and
label ids. synthval also reads every image's size from its PNG header and checks every box against it;
the pandas loader does neither, so the comparison flatters it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid

BBOX_DEF = "c31620e3-55ff-4af6-ae86-884aa0daa9b2"
SEG_DEF = "12f94d8d-5425-4deb-9b21-5e53ad957d66"
# SynthDet's metric definitions: Unity's ObjectCount and scenario iteration, SynthDet's own
# RenderedObjectInfo, lighting and foreground placement ids.
OBJECT_COUNT_DEF = "51da3c27-369d-4929-aea6-d01614635ce2"
RENDERED_DEF = "659c6e36-f9f8-4dd6-9651-4a80e51eabc4"
ITERATION_DEF = "db1b258e-d1d0-41b6-8751-16f601a2e230"
LIGHTING_DEF = "939248ee-668a-4e98-8e79-e7909f034a47"
PLACEMENT_DEF = "061e08cc-4428-4926-9933-a6732524b52b"
CAPTURES_PER_FILE = 150
WIDTH, HEIGHT = 640, 480
NUM_LABELS = 63
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(root: str, num_captures: int, seed: int = 0) -> None:
    """A SynthDet-shaped Perception 0.0.1 dataset under `root` (JSON + hard-linked tiny PNGs)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    dataset = os.path.join(root, "Dataset")
    rgb = os.path.join(root, "RGB" + uuid.UUID(int=rng.getrandbits(128)).hex)
    os.makedirs(dataset)
    os.makedirs(rgb)
    spec = [{"label_id": i, "label_name": f"product_{i:02d}"} for i in range(1, NUM_LABELS + 1)]
    definitions = {"version": "0.0.1", "annotation_definitions": [
        {"id": BBOX_DEF, "name": "bounding box", "description": "Bounding box for each labeled object",
         "format": "JSON", "spec": spec},
        {"id": SEG_DEF, "name": "semantic segmentation", "format": "PNG", "spec": []},
    ]}
    with open(os.path.join(dataset, "annotation_definitions.json"), "w") as f:
        json.dump(definitions, f, indent=2)
    with open(os.path.join(dataset, "metric_definitions.json"), "w") as f:
        json.dump({"version": "0.0.1", "metric_definitions": [
            {"id": OBJECT_COUNT_DEF, "name": "object count", "spec": spec},
            {"id": RENDERED_DEF, "name": "rendered object info", "spec": spec},
            {"id": ITERATION_DEF, "name": "scenario_iteration"},
            {"id": LIGHTING_DEF, "name": "lighting info"},
            {"id": PLACEMENT_DEF, "name": "Per Frame Foreground Object Placement Info"}]}, f, indent=2)
    template = os.path.join(root, "template.png")
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(template)

    sensor = {"sensor_id": str(uuid.UUID(int=rng.getrandbits(128))), "ego_id": str(uuid.UUID(int=1)),
              "modality": "camera", "translation": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0],
              "camera_intrinsic": [[1.8, 0.0, 0.0], [0.0, 2.4, 0.0], [0.0, 0.0, -1.0]], "projection": "perspective"}
    ego = {"ego_id": str(uuid.UUID(int=1)), "translation": [0.0, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0, 1.0],
           "velocity": None, "acceleration": None}
    file_index = 0
    for start in range(0, num_captures, CAPTURES_PER_FILE):
        captures, metrics = [], []
        for step in range(start, min(start + CAPTURES_PER_FILE, num_captures)):
            name = f"rgb_{step + 2}.png"
            os.link(template, os.path.join(rgb, name))
            values = []
            for _ in range(rng.randint(3, 7)):
                w, h = rng.uniform(10, 200), rng.uniform(10, 200)
                x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
                label = rng.randint(1, NUM_LABELS)
                values.append({"label_id": label, "label_name": f"product_{label:02d}",
                               "instance_id": rng.randint(1, 10_000), "x": x, "y": y, "width": w, "height": h})
            capture_id, sequence_id = str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=step + 7))
            metrics += synthdet_metrics(rng, capture_id, sequence_id, step, values)
            captures.append({
                "id": capture_id, "sequence_id": sequence_id,
                "step": 0, "timestamp": 0.0, "sensor": sensor, "ego": ego,
                "filename": f"{os.path.basename(rgb)}/{name}", "format": "PNG",
                "annotations": [
                    {"id": str(uuid.UUID(int=rng.getrandbits(128))), "annotation_definition": BBOX_DEF,
                     "values": values},
                    {"id": str(uuid.UUID(int=rng.getrandbits(128))), "annotation_definition": SEG_DEF,
                     "filename": f"SemanticSegmentation/segmentation_{step + 2}.png", "values": None},
                ],
            })
        with open(os.path.join(dataset, f"captures_{file_index:03d}.json"), "w") as f:
            json.dump({"version": "0.0.1", "captures": captures}, f, indent=2)
        with open(os.path.join(dataset, f"metrics_{file_index:03d}.json"), "w") as f:
            json.dump({"version": "0.0.1", "metrics": metrics}, f, indent=2)
        file_index += 1
    os.unlink(template)


def synthdet_metrics(rng, capture_id: str, sequence_id: str, step: int, boxes: list[dict]) -> list[dict]:
    """The metric records SynthDet writes for one capture (values random, shapes as Unity's)."""
    def record(definition: str, values: list, capture: str | None) -> dict:
        return {"capture_id": capture, "annotation_id": None, "sequence_id": sequence_id, "step": 0,
                "metric_definition": definition, "values": values}

    counts = {label: 0 for label in range(1, NUM_LABELS + 1)}
    for box in boxes:
        counts[box["label_id"]] += 1
    return [
        record(ITERATION_DEF, [{"iteration": step}], None),
        record(LIGHTING_DEF, [{"color": {"r": rng.random(), "g": rng.random(), "b": rng.random(), "a": 1.0},
                               "x_rotation": rng.uniform(-90, 90), "y_rotation": rng.uniform(-90, 90)}], None),
        record(PLACEMENT_DEF, [{"label_id": b["label_id"], "rotation": [rng.uniform(0, 360) for _ in range(3)],
                                "position": [rng.uniform(-5, 5) for _ in range(3)], "scale": [1.0, 1.0, 1.0]}
                               for b in boxes], None),
        record(OBJECT_COUNT_DEF, [{"label_id": label, "label_name": f"product_{label:02d}", "count": count}
                                  for label, count in counts.items()], capture_id),
        record(RENDERED_DEF, [{"label_id": b["label_id"], "instance_id": b["instance_id"],
                               "visible_pixels": int(b["width"] * b["height"] * rng.uniform(0.3, 1.0))}
                              for b in boxes], capture_id),
    ]


def pandas_index(root: str) -> list:
    """The seed's way: json_normalize captures and annotations per file, join, explode the box values."""
    import numpy as np
    import pandas as pd

    files = sorted(glob.glob(os.path.join(root, "Dataset", "captures_*.json")))
    captures, annotations = [], []
    for path in files:
        with open(path) as f:
            records = json.load(f)["captures"]
        captures.append(pd.json_normalize(records, max_level=0).drop(columns="annotations"))
        annotations.append(pd.json_normalize(records, record_path="annotations", meta="id", meta_prefix="capture."))
    captures_df = pd.concat(captures, axis=0)
    annotations_df = pd.concat(annotations, axis=0)
    mask = annotations_df["annotation_definition"] == BBOX_DEF
    boxes_df = annotations_df[mask].set_index("capture.id").add_prefix("annotation.")
    combined = captures_df.set_index("id").join(boxes_df, how="left")
    exploded = combined[["filename", "annotation.values"]].explode("annotation.values")
    has_box = exploded["annotation.values"].notna()
    values = pd.json_normalize(exploded.loc[has_box, "annotation.values"].tolist())
    # explode keeps each capture's boxes together and in capture order: slice, no per-capture lookups
    xyxy = values[["x", "y", "width", "height"]].to_numpy(np.float32, copy=True)
    xyxy[:, 2:] += xyxy[:, :2]
    labels = values["label_id"].to_numpy(np.int64)
    counts = has_box.groupby(level=0, sort=False).sum().reindex(combined.index).to_numpy()
    ends = np.cumsum(counts)
    return [(os.path.join(root, filename), xyxy[e - c:e], labels[e - c:e])
            for filename, c, e in zip(combined["filename"], counts.tolist(), ends.tolist())]


def synthval_index(root: str):
    from synthval.data import load_dataset

    return load_dataset(root, format="perception")


def metrics_pass(root: str):
    from synthval.data.stats import load_simulator_metrics

    return load_simulator_metrics(root, "perception")


LOADERS = {"synthval": synthval_index, "pandas": pandas_index, "metrics": metrics_pass}


def run_one(name: str, root: str, repeat: int) -> dict:
    """In this (fresh) process: time `repeat` runs of one loader, then one run under tracemalloc."""
    loader = LOADERS[name]
    import numpy  # noqa: F401  (imports are not what we measure)
    import pandas  # noqa: F401

    import synthval.data  # noqa: F401

    times, cpu, count = [], [], 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = loader(root)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        count = len(result.image_paths) if name == "metrics" else len(result)
        del result
    tracemalloc.start()
    result = loader(root)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if name == "metrics":
        boxes = len(result.box_instance_ids)
    else:
        boxes = sum(len(r.boxes) for r in result.images) if name == "synthval" else sum(len(r[1]) for r in result)
    return {"best_s": min(times), "times_s": times, "cpu_s": cpu, "best_cpu_s": min(cpu),
            "tracemalloc_peak_mb": peak / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "images": count, "boxes": boxes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captures", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="write the dataset here and keep it (reused as it is if present)")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of the index now and before")
    p.add_argument("--baseline", default="auto", metavar="REV",
                   help="git revision whose tasks/ is the index before (default: merge-base of HEAD and main; "
                        "'none' to skip)")
    p.add_argument("--run", choices=sorted(LOADERS), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(args.run, args.root, args.repeat)))
        return 0

    root = args.keep or tempfile.mkdtemp(prefix="bench-index-")
    baseline_dir = None
    try:
        if not glob.glob(os.path.join(root, "Dataset", "captures_*.json")):
            t0 = time.perf_counter()
            write_dataset(root, args.captures)
            print(f"wrote {args.captures} captures in {time.perf_counter() - t0:.1f}s under {root}")
        for kind in ("captures", "metrics"):
            found = glob.glob(os.path.join(root, "Dataset", f"{kind}_*.json"))
            print(f"dataset {root}: {len(found)} {kind}_*.json files, "
                  f"{sum(os.path.getsize(f) for f in found) / 2**20:.1f} MiB of JSON")
        revision = baseline_revision(args.baseline)
        compared = [("synthval", "synthval", None)]
        if revision:
            baseline_dir = tempfile.mkdtemp(prefix="bench-index-baseline-")
            export_tasks(revision, baseline_dir)
            compared.append(("baseline", "synthval", baseline_dir))
        # Now and before alternate, in turns (ABBA), so that a busy spell on a shared machine or a warm
        # cache favours neither.
        runs = [run for r in range(args.rounds) for run in (compared if r % 2 == 0 else compared[::-1])]
        runs += [("pandas", "pandas", None), ("metrics", "metrics", None)]
        results: dict[str, dict] = {}
        for label, name, pythonpath in runs:
            env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
            command = [sys.executable, __file__, "--run", name, "--root", root, "--repeat", str(args.repeat)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if label in results:
                for key in ("times_s", "cpu_s"):
                    result[key] = results[label][key] + result[key]
                result["best_s"], result["best_cpu_s"] = min(result["times_s"]), min(result["cpu_s"])
            results[label] = result
        print(f"{'loader':<10} {'images':>7} {'boxes':>8} {'best s':>7} {'best CPU s':>10} {'wall s of each run':>40} "
              f"{'tracemalloc MiB':>16} {'peak RSS MiB':>13}")
        for name, r in results.items():
            times = " ".join(f"{t:.2f}" for t in r["times_s"])
            print(f"{name:<10} {r['images']:>7} {r['boxes']:>8} {r['best_s']:>7.2f} {r['best_cpu_s']:>10.2f} "
                  f"{times:>40} {r['tracemalloc_peak_mb']:>16.1f} {r['max_rss_mb']:>13.0f}")
        s, b = results["synthval"], results["pandas"]
        print(f"pandas / synthval: time x{b['best_s'] / s['best_s']:.1f}, tracemalloc peak "
              f"x{b['tracemalloc_peak_mb'] / s['tracemalloc_peak_mb']:.1f}, "
              f"peak RSS x{b['max_rss_mb'] / s['max_rss_mb']:.1f}")
        if "baseline" in results:
            # CPU time: other processes on a shared machine stretch wall time, far less the CPU a run needs
            base = results["baseline"]
            ratio = s["best_cpu_s"] / base["best_cpu_s"]
            print(f"index now / index at {revision[:12]}: best CPU x{ratio:.3f} ({(ratio - 1) * 100:+.1f}%, "
                  f"{'within' if ratio <= 1.10 else 'OVER'} the 10% budget), "
                  f"best wall x{s['best_s'] / base['best_s']:.3f}, "
                  f"tracemalloc peak x{s['tracemalloc_peak_mb'] / base['tracemalloc_peak_mb']:.2f}")
        m = results["metrics"]
        both = (s["best_cpu_s"] + m["best_cpu_s"]) / s["best_cpu_s"]
        print(f"metrics pass (synthval stats only): {m['best_s']:.2f} s ({m['best_cpu_s']:.2f} s CPU), "
              f"{m['tracemalloc_peak_mb']:.0f} MiB traced; index + metrics x{both:.2f} of the index alone (CPU)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        if baseline_dir:
            shutil.rmtree(baseline_dir, ignore_errors=True)
    return 0


def baseline_revision(choice: str) -> str | None:
    """The git revision to compare the index with: REV as given, the merge-base of HEAD and main for
    "auto" (None where there is no main branch), None for "none"."""
    if choice == "none":
        return None
    here = REPO
    if choice == "auto":
        found = subprocess.run(["git", "-C", here, "merge-base", "HEAD", "main"], capture_output=True, text=True)
        if found.returncode != 0:
            print("no main branch here: no baseline index (pass --baseline REV)")
            return None
        choice = found.stdout.strip()
    return subprocess.run(["git", "-C", here, "rev-parse", "--verify", choice], capture_output=True, text=True,
                          check=True).stdout.strip()


def export_tasks(revision: str, target: str) -> None:
    """`tasks/` of `revision` under `target` (so that PYTHONPATH=target imports that synthval)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", revision, "tasks/"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", target, "--strip-components=1"], input=archive, check=True)


if __name__ == "__main__":
    sys.exit(main())
