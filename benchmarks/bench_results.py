"""`synthval publish` and `synthval leaderboard` on a results store of 10,000 rows, against synthval 0.1.0.

The store is shaped like a year of discovery: 2,000 synthetic datasets valued at budget 0 and fine-tuned
on 3 real budgets, a real-only curve of 3 budgets x 5 seeds, and evaluate_the_model / recipe runs up to
10,000 rows, all on one benchmark. Each row's record is a real one (`synthval evaluate` on a small COCO
set, then `synthval publish`), copied with its model, dataset and budget changed; rows are written with
the store's own row builder in one transaction (building the store is not what is measured).

Measured, each as the median of `--repeats` runs in this process and as a user runs it (a fresh
`synthval` process, interpreter start-up included):
- publish: one more result into the 10,000-row store (`--no-report`: the run report reads the test set's
  images and is the same work on any store);
- leaderboard: the whole board (real-image equivalents with their 2,000-replicate bootstrap intervals)
  as a table, and as JSON.
The baseline is synthval 0.1.0 (commit a2afb49, read with `git show`), the same operations on a
schema-1 store of the same rows, in the same run; skipped with a note where git or that commit is not
there. Not a test; run `python benchmarks/bench_results.py`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "a2afb49"
sys.path.insert(0, str(ROOT / "tests"))


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_record(work: Path) -> tuple[dict[str, Any], str]:
    """A record published by synthval from a real evaluation, and its metrics.json."""
    from test_publish import write_coco

    from synthval.cli import main
    from synthval.steps.publish import run_publish

    data = write_coco(work / "real")
    doc = json.loads((data / "annotations" / "instances.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"] if a["category_id"] == 1]
    (work / "detections.json").write_text(json.dumps(results))
    assert main(["evaluate", "--predictions", str(work / "detections.json"), "--data", str(data), "--split", "all",
                 "--out", str(work / "eval"), "--xcom-file", str(work / "x.json")]) == 0
    metrics = str(work / "eval" / "metrics.json")
    out = run_publish(metrics, str(work / "seed-results"), "evaluate_new_synthetic_datasets", "seed", {
        "synthetic": "gs://bucket/inbox/seed", "real": "groceries-real"}, None, 0, report=False)
    return json.loads(Path(out["result_uri"]).read_text()), metrics


def plan(rows: int) -> list[tuple[str, str, int | None, int]]:
    """(recipe, role, budget, index) of every row: a discovery year, a real-only curve, other recipes."""
    out = [("evaluate_new_synthetic_datasets", "real", b, s) for b in (76, 380, 760) for s in range(5)]
    for i in range(2000):
        out += [("evaluate_new_synthetic_datasets", "synthetic", 0, i)]
        out += [("evaluate_new_synthetic_datasets", "synthetic+real", b, i) for b in (76, 380, 760)]
    i = 0
    while len(out) < rows:
        out.append(("evaluate_the_model", "model", None, i) if i % 2 else ("train_on_synthdet_sample", "synthetic", 0, i))
        i += 1
    return out[:rows]


def new_store_rows(record: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    from synthval.scoring.protocol import sha256_of
    from synthval.results.store import row_from_record

    built = []
    for n, (recipe, role, budget, i) in enumerate(plan(rows)):
        r = copy.deepcopy(record)
        dataset = {"real": "groceries-real", "model": f"gs://bucket/models/m-{i}.pt"}.get(role, f"gs://bucket/inbox/d-{i}")
        r.update(recipe=recipe, real_budget=budget, record_id=f"{recipe}-{n:020d}", run_id=f"scheduled__{n}")
        r["model"] = {**r["model"], "id": sha256_of({"bench": n}), "role": role, "dataset": dataset}
        r["metrics"]["mAP"] = round(0.05 + 0.5 * ((n * 7919) % 1000) / 1000, 4)
        if role == "real":
            r["metrics"]["mAP"] = {76: 0.2, 380: 0.35, 760: 0.4}[budget] + 0.01 * i
            r["checkpoint"] = {"config": {"seed": i}}
        built.append({**row_from_record(r, f"gs://bucket/results/{r['record_id']}.json"),
                      "updated_at": r["created_at"]})
    return built


def v1_store_rows(record: dict[str, Any], rows: int, v1_results: Any) -> list[dict[str, Any]]:
    built = []
    for n, (recipe, role, budget, i) in enumerate(plan(rows)):
        r = copy.deepcopy(record)
        r.pop("model")
        r.update(recipe=recipe, real_budget=budget, record_id=f"{recipe}-{n:020d}", run_id=f"scheduled__{n}",
                 schema_version=1, protocol_fingerprint="f" * 64)
        r["datasets"] = ({"real": "groceries-real"} if role == "real" else
                         {"real": "groceries-real"} if role == "model" else
                         {"synthetic": f"gs://bucket/inbox/d-{i}", "real": "groceries-real"})
        r["checkpoint_uri"] = f"gs://bucket/models/m-{i}.pt"
        r["metrics"]["mAP"] = round(0.05 + 0.5 * ((n * 7919) % 1000) / 1000, 4)
        r["checkpoint"] = {"config": {"seed": n}}  # schema 1's key: distinct seeds keep the rows apart
        if role == "real":
            r["metrics"]["mAP"] = {76: 0.2, 380: 0.35, 760: 0.4}[budget] + 0.01 * i
        built.append({**v1_results.row_from_record(r, f"gs://bucket/results/{r['record_id']}.json"),
                      "updated_at": r["created_at"]})
    return built


def fill(store: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    import sqlalchemy as sa

    with store.engine.begin() as conn:
        conn.execute(sa.insert(table), rows)


def load_baseline(work: Path) -> dict[str, Any] | None:
    """synthval 0.1.0's results, publish and leaderboard modules, or None."""
    modules = {}
    for name in ("results", "publish", "leaderboard"):
        try:
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:tasks/synthval/{name}.py"],
                                    capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        path = work / f"v1_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"v1_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def cli_seconds(argv: list[str], env: dict[str, str], repeats: int) -> float:
    synthval = str(Path(sys.executable).with_name("synthval"))

    def run() -> None:
        subprocess.run([synthval, *argv], env=env, check=True, capture_output=True)

    return median_seconds(run, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; {args.rows} rows, median of {args.repeats}")

    from synthval.results.leaderboard import build_leaderboard, format_table, to_json
    from synthval.steps.publish import run_publish
    from synthval.results.store import open_store

    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        work = Path(tmp)
        record, metrics = real_record(work)
        url = f"sqlite:///{work / 'store.db'}"
        store = open_store(url)
        fill(store, store.results, new_store_rows(record, args.rows))
        store.register_benchmark("evaluate_new_synthetic_datasets", record["benchmark_fingerprint"])
        assert store.count() == args.rows

        counter = iter(range(10**6))

        def publish_new() -> None:
            detections = work / f"more-{next(counter)}.json"
            detections.write_text("[]")
            edited = json.loads(Path(metrics).read_text())
            edited["source_predictions_uri"] = str(detections)  # a model of its own: a new row
            Path(work / "m.json").write_text(json.dumps(edited))
            run_publish(str(work / "m.json"), str(work / "results"), "evaluate_new_synthetic_datasets", "r",
                        {"synthetic": "gs://bucket/inbox/new", "real": "groceries-real"}, None, 0, store_url=url,
                        report=False)

        def board(output: Callable[[list], str]) -> Callable[[], None]:
            return lambda: output(build_leaderboard(store.rows(with_records=False)))

        figures = {  # the boards first: the published rows below join the store
            "leaderboard table (in process)": median_seconds(board(format_table), args.repeats),
            "leaderboard json (in process)": median_seconds(board(to_json), args.repeats),
            "publish (in process)": median_seconds(publish_new, args.repeats),
        }
        env = dict(os.environ, SYNTHVAL_RESULTS_DB_URL=url)
        (work / "cli-metrics.json").write_text(Path(metrics).read_text())
        publish_argv = ["publish", "--metrics", str(work / "cli-metrics.json"), "--results", str(work / "results"),
                        "--recipe", "evaluate_new_synthetic_datasets", "--dataset", "synthetic=gs://b/inbox/cli",
                        "--dataset", "real=groceries-real", "--real-budget", "0", "--no-report",
                        "--xcom-file", os.devnull]
        figures["synthval publish (CLI)"] = cli_seconds(publish_argv, env, args.repeats)
        figures["synthval leaderboard (CLI)"] = cli_seconds(["leaderboard", "--xcom-file", os.devnull], env,
                                                             args.repeats)
        figures["synthval leaderboard --format json (CLI)"] = cli_seconds(
            ["leaderboard", "--format", "json", "--xcom-file", os.devnull], env, args.repeats)

        baseline: dict[str, float] = {}
        v1 = load_baseline(work)
        if v1 is not None:
            v1_url = f"sqlite:///{work / 'store-v1.db'}"
            v1_store = v1["results"].open_store(v1_url)
            fill(v1_store, v1_store.results, v1_store_rows(record, args.rows, v1["results"]))
            v1_store.register_protocol("evaluate_new_synthetic_datasets", "f" * 64)

            def v1_publish() -> None:
                result = v1["publish"].run_publish(metrics, str(work / "results-v1"), "evaluate_new_synthetic_datasets",
                                                   f"r{next(counter)}", {"synthetic": "gs://bucket/inbox/new",
                                                                         "real": "groceries-real"}, None, 0,
                                                   report=False)
                v1_store.upsert(json.loads(Path(result["result_uri"]).read_text()), result["result_uri"])

            # One build for both outputs (0.1.0 bootstraps each row in a Python loop: minutes at 10,000 rows),
            # before any publish: 0.1.0's protocol of a path would make every row of the recipe stale.
            start = time.perf_counter()
            entries = v1["leaderboard"].build_leaderboard(v1_store.rows())
            built = time.perf_counter() - start
            assert sum(e["real_equiv"] is not None for e in entries) == args.rows  # every row valued
            baseline["leaderboard table (in process)"] = built + median_seconds(
                lambda: v1["leaderboard"].format_table(entries), 1)
            baseline["leaderboard json (in process)"] = built + median_seconds(
                lambda: v1["leaderboard"].to_json(entries), 1)
            baseline["publish (in process)"] = median_seconds(v1_publish, args.repeats)

    width = max(map(len, figures))
    print(f"{'':{width}}  {'this synthval':>14}  {'0.1.0':>10}  {'speed-up':>8}")
    for name, seconds in figures.items():
        old = baseline.get(name)
        ratio = f"{old / seconds:7.1f}x" if old else "       -"
        print(f"{name:{width}}  {seconds:12.3f} s  {f'{old:.3f} s' if old else '-':>10}  {ratio}")
    if v1 is None:
        print(f"(no baseline: git or commit {BASELINE_COMMIT} not available)")
    else:
        print("(0.1.0's leaderboard built once for both outputs; its publish wrote a store keyed without the model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
