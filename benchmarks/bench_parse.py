"""CPU time to parse each DAG file, as Airflow's dag-processor does it, per backend: now against a baseline.

Airflow's guideline is well under a second per DAG file; this project's target is 0.3 CPU-seconds. The
dag-processor (Airflow 3.3) parses one file per fresh process: its manager process first imports the
`airflow.*` modules the file imports at top level (`parsing_pre_import_modules`), then forks a child
that imports the file, collects its DAGs and serializes them. This script does the same, per file:
a "manager" process that has imported Airflow's dag-processing modules forks, pre-imports the file's
airflow imports, and forks the parsing child running the dag-processor's own `_parse_file`; the child's
CPU time (user + system, from `wait4`) is the figure. Each figure is the median of --repeat children.

    python benchmarks/bench_parse.py [--repeat 5] [--baseline a2afb49] [--backends local kubernetes gke]

The baseline's dags/ comes from git (`git archive <rev> dags`) and runs in the same invocation, so both
columns share this machine's load. The pod backends need the settings a cluster deployment sets; the
values here are placeholders (nothing is contacted while parsing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3
SETTINGS = {  # what a cluster deployment sets (deploy/helm/values.yaml); placeholders, never contacted
    "SYNTHVAL_DATA_ROOT": "gs://bucket/synthval",
    "SYNTHVAL_IMAGE_TAG": "0.1.0",
    "SYNTHVAL_RESULTS_DB_SECRET": "synthval-results-db",
    "SYNTHVAL_GKE_PROJECT": "project",
    "SYNTHVAL_GKE_LOCATION": "europe-west4",
    "SYNTHVAL_GKE_CLUSTER": "synthval",
}


def dag_files(folder: Path) -> list[Path]:
    """The files the dag-processor parses: .py files that .airflowignore does not exclude and that pass
    Airflow's "might contain a DAG" test."""
    import re

    from airflow.utils.file import might_contain_dag_via_default_heuristic

    ignore = folder / ".airflowignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip()] if ignore.exists() else []
    return [f for f in sorted(folder.glob("*.py"))
            if not any(re.search(p, f.name) for p in patterns) and might_contain_dag_via_default_heuristic(str(f))]


def parse_cpu_s(path: Path, backend: str) -> float:
    """CPU seconds of one dag-processor parsing child for `path` (forked from this "manager")."""
    import structlog

    from airflow.dag_processing import processor

    read, write = os.pipe()
    manager = os.fork()
    if manager == 0:  # a manager as it is when it starts this file: the file's airflow imports pre-imported
        os.close(read)
        os.environ["SYNTHVAL_BACKEND"] = backend
        processor._pre_import_airflow_modules(str(path), structlog.get_logger())
        child = os.fork()
        if child == 0:
            request = processor.DagFileParseRequest(file=str(path), bundle_path=path.parent, bundle_name="bench",
                                                    callback_requests=[])
            result = processor._parse_file(request, structlog.get_logger())
            ok = result is not None and not result.import_errors and result.serialized_dags
            os._exit(0 if ok else 3)
        _, status, usage = os.wait4(child, 0)
        os.write(write, json.dumps([status, usage.ru_utime + usage.ru_stime]).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    os.waitpid(manager, 0)
    status, cpu = json.loads(data)
    if status != 0:
        raise RuntimeError(f"{path} ({backend}): parsing failed (status {status}); run `airflow dags list-import-errors`")
    return cpu


def baseline_dags(rev: str, into: Path) -> Path | None:
    """The baseline's dags/ folder, extracted from git; None when the revision is not available."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dags"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline {rev}: not available ({exc}); showing the current tree only", file=sys.stderr)
        return None
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "dags"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="parsing children per file and backend (median)")
    parser.add_argument("--baseline", default="a2afb49", help="git revision to compare with")
    parser.add_argument("--backends", nargs="+", default=["local", "kubernetes", "gke"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        os.environ.update(SETTINGS)
        os.environ.setdefault("AIRFLOW_HOME", os.path.join(tmp, "airflow"))
        os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
        os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
        trees = {"now": ROOT / "dags"}
        base = baseline_dags(args.baseline, Path(tmp) / "baseline")
        if base is not None:
            trees = {args.baseline: base, **trees}
        # What the dag-processor manager has imported before it starts any file.
        import airflow.dag_processing.manager  # noqa: F401
        import airflow.jobs.dag_processor_job_runner  # noqa: F401
        from airflow.dag_processing import processor  # noqa: F401
        from airflow.sdk.execution_time import task_runner  # noqa: F401

        names = sorted({f.name for folder in trees.values() for f in dag_files(folder)})
        print(f"DAG file parsing, CPU seconds per file (median of {args.repeat} dag-processor children); "
              f"target <= {TARGET_S} s")
        head = f"{'backend':11s} {'file':50s}" + "".join(f"{t:>10s}" for t in trees) + "     ratio  target"
        print(head)
        worst = 0.0
        for backend in args.backends:
            totals = dict.fromkeys(trees, 0.0)
            for name in names:
                row = {}
                for tree, folder in trees.items():
                    if (folder / name).exists():
                        row[tree] = statistics.median(parse_cpu_s(folder / name, backend) for _ in range(args.repeat))
                        totals[tree] += row[tree]
                if "now" not in row:
                    continue
                now = row["now"]
                worst = max(worst, now)
                ratio = f"{row[args.baseline] / now:8.1f}x" if args.baseline in row else " " * 9
                cells = "".join(f"{row[t]:10.2f}" if t in row else f"{'-':>10s}" for t in trees)
                print(f"{backend:11s} {name:50s}{cells} {ratio}  {'ok' if now <= TARGET_S else 'OVER'}")
            cells = "".join(f"{totals[t]:10.2f}" for t in trees)
            ratio = f"{totals[args.baseline] / totals['now']:8.1f}x" if args.baseline in totals else ""
            print(f"{backend:11s} {'all files (one parsing loop)':50s}{cells} {ratio}")
        print(f"slowest file now: {worst:.2f} s CPU ({'within' if worst <= TARGET_S else 'OVER'} the {TARGET_S} s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
