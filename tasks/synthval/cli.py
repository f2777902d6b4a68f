"""The `synthval` command line: one subcommand per pipeline step.

Each subcommand parses its flags, calls `synthval.steps.<step>.run_<step>(...)`, and writes the small
JSON that step returns (URIs, never data) to the XCom file, `/airflow/xcom/return.json` by default:
the KubernetesPodOperator contract. Exit codes: 0 success, 2 bad input or usage, 1 anything else.
This is the only module that reads the settings users give as environment variables (the XCom file,
the Unity Simulation token and API, the results database) and passes them down as arguments. Two
standard variables are read where they act, by their owners' contracts: torchrun's RANK / LOCAL_RANK /
WORLD_SIZE (`detection/distributed.py`; also RANK here, so that only rank 0 writes XCom without
importing torch) and gcsfs's STORAGE_EMULATOR_HOST (`io/storage.py`).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from synthval import __version__
from synthval.errors import SynthvalError
from synthval.io.archives import DEFAULT_MAX_MEMBERS

# Idle OpenMP threads spin by default; on a busy CPU node (2 threads, other processes) that cut the
# training rate ~10x (bench_train.py). Must be set before torch loads, which happens below on demand.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("synthval")

DEFAULT_XCOM_FILE = "/airflow/xcom/return.json"
XCOM_ENV = "SYNTHVAL_XCOM_FILE"
USIM_TOKEN_ENV = "USIM_ACCESS_TOKEN"
USIM_TOKEN_FILE_ENV = "USIM_ACCESS_TOKEN_FILE"
USIM_API_ENV = "SYNTHVAL_USIM_API"
DATASET_FORMATS = ("auto", "perception", "solo", "coco", "groceries")


class UsageError(SynthvalError):
    exit_code = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--xcom-file",
        default=None,
        help=f"where to write the step's result JSON (env {XCOM_ENV}; default {DEFAULT_XCOM_FILE})",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_config(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    p.add_argument("--preset", default=preset_default,
                   help="named recipe: seed-synthetic, seed-real, seed-finetune, seed-unity-simulation, modern, cpu-demo")
    p.add_argument("--config", default=None, metavar="URI", help="YAML config file applied over the preset")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set optimizer.lr=0.01 (repeatable)",
    )


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=DATASET_FORMATS, help="dataset format (default: detect)")
    p.add_argument(
        "--bbox-definition", default=None, metavar="ID",
        help="Perception 0.0.1 annotation definition id of the 2D boxes (default: SynthDet's)",
    )
    p.add_argument("--skip-broken", action="store_true", help="skip missing or empty images instead of failing")


def get_parser() -> argparse.ArgumentParser:
    """Return the full parser; tests and the DAG contract test reuse it."""
    parser = _Parser(prog="synthval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"synthval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fetch", help="download a dataset or model (http, gs, usim, named source)")
    p.add_argument("source", help="URI, usim://PROJECT/RUN_EXECUTION, a name (groceries-real, synthdet-sample, "
                   "a published model), or generate://KIND?num_images=N for procedural demo data")
    p.add_argument("--out", required=True, metavar="URI", help="destination folder")
    p.add_argument("--checksum", default=None, metavar="ALGO:HEX", help="crc32:..., md5:... or sha256:...")
    p.add_argument("--no-extract", action="store_true", help="keep archives as they are")
    p.add_argument("--max-extract-bytes", type=int, default=64 * 2**30,
                   help="archive bomb limit: bytes extracted from an archive (default 64 GiB)")
    p.add_argument("--max-extract-members", type=int, default=DEFAULT_MAX_MEMBERS,
                   help=f"archive bomb limit: members of an archive (default {DEFAULT_MAX_MEMBERS:,})")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument(
        "--usim-token-file", default=None, metavar="PATH",
        help=f"file holding the Unity Simulation token (else env {USIM_TOKEN_ENV} or {USIM_TOKEN_FILE_ENV})",
    )
    _add_common(p)

    p = sub.add_parser("generate", help="write procedural demo data (NOT real data)")
    p.add_argument("--kind", required=True, choices=["synthetic", "real-proxy"])
    p.add_argument("--out", required=True, metavar="URI")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="perception", choices=["perception", "solo"],
                   help="layout of the synthetic set (real-proxy is always GroceriesReal v3)")
    _add_common(p)

    for name, help_text in (
        ("train", "train Faster R-CNN on a dataset"),
        ("finetune", "fine-tune a trained checkpoint on (real) data"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--train-data", required=True, metavar="URI")
        p.add_argument("--train-split", default=None, help="split of --train-data (config data.split)")
        p.add_argument("--max-images", type=int, default=None, help="use N images of the split (config data.max_images)")
        p.add_argument("--val-data", default=None, metavar="URI")
        p.add_argument("--val-split", default=None, help="split of --val-data (config data.val_split)")
        p.add_argument("--init-checkpoint", required=(name == "finetune"), default=None, metavar="URI",
                       help="start from these weights; the classifier head is mapped by label name")
        p.add_argument("--checkpoint-dir", required=True, metavar="URI")
        p.add_argument("--tb-log-dir", required=True, metavar="URI")
        p.add_argument("--resume", default="auto", metavar="auto|none|URI",
                       help="auto: continue from the newest checkpoint in --checkpoint-dir")
        _add_dataset_options(p)
        _add_config(p, preset_default=None)
        _add_common(p)

    p = sub.add_parser("evaluate", help="COCO metrics of a checkpoint or a results file on a dataset")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="URI", help="checkpoint URI or published model name")
    source.add_argument("--predictions", metavar="URI", help="COCO results JSON to score without a model")
    p.add_argument("--data", required=True, metavar="URI")
    p.add_argument("--split", default=None, help="split of --data (config split; default: the dataset's test split if it defines splits, else all)")
    p.add_argument("--out", required=True, metavar="URI", help="folder for metrics.json and predictions")
    p.add_argument("--tb-log-dir", default=None, metavar="URI")
    _add_dataset_options(p)
    _add_config(p, preset_default=None)
    _add_common(p)

    p = sub.add_parser("publish", help="write the versioned result record of an evaluation")
    p.add_argument("--metrics", required=True, metavar="URI", help="metrics.json written by evaluate")
    p.add_argument("--results", required=True, metavar="URI", help="folder of result records")
    p.add_argument("--recipe", required=True, help="recipe (DAG) name")
    p.add_argument("--run-id", default=None, help="orchestrator run id, for provenance")
    p.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="ROLE=URI",
                   help="what the model was trained on, by role: synthetic=URI, real=URI (the real dataset; "
                        "training data with --real-budget > 0), model=URI or name (a given model) (repeatable)")
    p.add_argument("--checkpoint", default=None, metavar="URI")
    p.add_argument("--real-budget", type=int, default=None, help="real images used for training")
    p.add_argument("--no-report", action="store_true",
                   help="skip the HTML run report written beside the record (it reads the test set's images)")
    _add_common(p)

    _add_report_commands(sub)
    _add_results_commands(sub)

    p = sub.add_parser("version", help="print the version; a no-op step for measuring orchestration")
    _add_common(p)

    p = sub.add_parser("config-schema", help="the JSON schema of the configs, from which the DAG Params are built")
    p.add_argument("--out", default=None, metavar="URI",
                   help="where to write it (dags/synthval_config_schema.json in a checkout; default: print it)")
    _add_common(p)
    return parser


def _config_text(uri: str | None) -> str | None:
    if uri is None:
        return None
    from synthval.io import storage

    return storage.read_text(uri)


def _usim_token(path: str | None) -> str | None:
    path = path or os.environ.get(USIM_TOKEN_FILE_ENV)
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get(USIM_TOKEN_ENV)


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch a parsed command line to its `run_<step>`; return the step's XCom result."""
    if args.command == "fetch":
        from synthval.steps.fetch import run_fetch

        return run_fetch(
            source=args.source, out_uri=args.out, checksum=args.checksum, extract=not args.no_extract,
            max_extract_bytes=args.max_extract_bytes, max_extract_members=args.max_extract_members,
            retries=args.retries,
            usim_token=_usim_token(args.usim_token_file) if args.source.startswith("usim://") else None,
            usim_api=os.environ.get(USIM_API_ENV),
        )
    if args.command == "generate":
        from synthval.steps.generate import run_generate

        return run_generate(kind=args.kind, out_uri=args.out, num_images=args.num_images,
                            image_size=args.image_size, seed=args.seed, layout=args.format)
    if args.command in ("train", "finetune"):
        from synthval.config import TrainConfig, load_config

        overrides = list(args.overrides)
        for flag, key in ((args.train_split, "data.split"), (args.val_split, "data.val_split"),
                          (args.max_images, "data.max_images")):
            if flag is not None:
                overrides.append(f"{key}={flag}")
        config = load_config(TrainConfig, preset=args.preset, config_text=_config_text(args.config),
                             overrides=overrides, source=args.config or "config",
                             finetune=args.command == "finetune")
        from synthval.steps.train import run_train  # torch is imported only once the config is known good

        return run_train(
            config, train_data_uri=args.train_data, val_data_uri=args.val_data,
            init_checkpoint_uri=args.init_checkpoint, checkpoint_dir_uri=args.checkpoint_dir,
            tb_log_dir_uri=args.tb_log_dir, resume=args.resume, dataset_format=args.format,
            bbox_definition_id=args.bbox_definition, skip_broken=args.skip_broken,
        )
    if args.command == "evaluate":
        from synthval.config import EvalConfig, load_config

        overrides = list(args.overrides) + ([f"split={args.split}"] if args.split is not None else [])
        config = load_config(EvalConfig, preset=None, config_text=_config_text(args.config),
                             overrides=overrides, source=args.config or "config")
        from synthval.steps.evaluate import run_evaluate

        return run_evaluate(
            config, data_uri=args.data, out_uri=args.out, checkpoint_uri=args.checkpoint,
            predictions_uri=args.predictions, tb_log_dir_uri=args.tb_log_dir, dataset_format=args.format,
            bbox_definition_id=args.bbox_definition, skip_broken=args.skip_broken,
        )
    if args.command == "publish":
        from synthval.steps.publish import run_publish

        datasets = {}
        for item in args.datasets:
            role, sep, uri = item.partition("=")
            if not sep or not role or not uri:
                raise UsageError(f"--dataset {item!r}: expected ROLE=URI, e.g. real=gs://bucket/groceries")
            datasets[role] = uri
        return run_publish(metrics_uri=args.metrics, results_uri=args.results, recipe=args.recipe,
                           run_id=args.run_id, datasets=datasets, checkpoint_uri=args.checkpoint,
                           real_budget=args.real_budget, store_url=_results_db_url(None, args.results),
                           report=not args.no_report)
    if args.command in REPORT_COMMANDS:
        return _run_report_command(args)
    if args.command in RESULTS_COMMANDS:
        return _run_results_command(args)
    if args.command == "version":
        return {"version": __version__}
    if args.command == "config-schema":
        return _write_config_schema(args.out)
    raise UsageError(f"unknown command {args.command!r}")


def _write_config_schema(out_uri: str | None) -> dict[str, Any]:
    from synthval.config import config_schema_text

    text = config_schema_text()
    if out_uri is None:
        sys.stdout.write(text)
        return {}
    from synthval.io import storage

    storage.write_text(out_uri, text)
    return {"schema_uri": out_uri}


# --- reports: report, compare, stats (issue 6) -------------------------------------------------------

REPORT_COMMANDS = ("report", "compare", "stats")


def _add_bootstrap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicates", type=int, default=1000, help="bootstrap resamples of the test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")


def _add_report_commands(sub: Any) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of an evaluation, with confidence intervals")
    p.add_argument("--metrics", required=True, metavar="URI", help="metrics.json written by evaluate")
    p.add_argument("--predictions", default=None, metavar="URI",
                   help="COCO results JSON (default: the predictions_uri metrics.json names)")
    p.add_argument("--data", default=None, metavar="URI", help="test set (default: the data_uri metrics.json names)")
    p.add_argument("--split", default=None, help="split of --data (default: the split metrics.json names)")
    p.add_argument("--out", required=True, metavar="URI", help="an .html file, or a folder for report.html")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="draw detections scoring at least this (default: the evaluation's draw_score_thresh)")
    p.add_argument("--gallery-size", type=int, default=6, help="worst and best images shown, each")
    _add_bootstrap_options(p)
    _add_dataset_options(p)
    _add_common(p)

    p = sub.add_parser("compare", help="several results side by side: is each difference larger than its noise?")
    p.add_argument("--metrics", required=True, nargs="+", metavar="URI",
                   help="metrics.json files or published result records (two or more)")
    p.add_argument("--names", nargs="+", default=None, help="a display name per result, in order")
    p.add_argument("--data", default=None, metavar="URI", help="test set for all (default: each metrics.json's own)")
    p.add_argument("--split", default=None)
    p.add_argument("--format", default="auto", choices=DATASET_FORMATS, help="dataset format (default: detect)")
    p.add_argument("--out", required=True, metavar="URI", help="an .html file, or a folder for compare.html")
    _add_bootstrap_options(p)
    _add_common(p)

    p = sub.add_parser("stats", help="dataset statistics, and the distance to a second dataset (domain gap)")
    p.add_argument("--data", required=True, metavar="URI")
    p.add_argument("--split", default=None, help="split of --data (default: all images)")
    p.add_argument("--name", default=None, help="display name of --data (default: its folder name)")
    p.add_argument("--compare-data", default=None, metavar="URI", help="a second dataset, e.g. the real test set")
    p.add_argument("--compare-split", default=None)
    p.add_argument("--compare-format", default="auto", choices=DATASET_FORMATS)
    p.add_argument("--compare-name", default=None)
    p.add_argument("--pixel-sample", type=int, default=64,
                   help="images decoded for brightness statistics (0: none; everything else reads no pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel sample")
    p.add_argument("--out", required=True, metavar="URI", help="folder for stats.json, stats.html and plots/")
    _add_dataset_options(p)
    _add_common(p)


def _run_report_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "report":
        from synthval.steps.report import run_report

        return run_report(metrics_uri=args.metrics, out_uri=args.out, predictions_uri=args.predictions,
                          data_uri=args.data, split=args.split, dataset_format=args.format,
                          bbox_definition_id=args.bbox_definition, skip_broken=args.skip_broken,
                          score_threshold=args.score_threshold, replicates=args.replicates, seed=args.seed,
                          gallery_size=args.gallery_size)
    if args.command == "compare":
        from synthval.steps.compare import run_compare

        return run_compare(metrics_uris=args.metrics, out_uri=args.out, names=args.names, data_uri=args.data,
                           split=args.split, dataset_format=args.format, replicates=args.replicates, seed=args.seed)
    from synthval.steps.stats import run_stats

    return run_stats(data_uri=args.data, out_uri=args.out, split=args.split, dataset_format=args.format,
                     bbox_definition_id=args.bbox_definition, skip_broken=args.skip_broken, name=args.name,
                     compare_data_uri=args.compare_data, compare_split=args.compare_split,
                     compare_format=args.compare_format, compare_name=args.compare_name,
                     pixel_sample=args.pixel_sample, seed=args.seed)


# --- results store: leaderboard, discover (issue 4) ------------------------------------------------------

RESULTS_COMMANDS = ("leaderboard", "discover")
RESULTS_DB_ENV = "SYNTHVAL_RESULTS_DB_URL"


def _results_db_url(flag: str | None, results_uri: str | None) -> str:
    """--db, else env SYNTHVAL_RESULTS_DB_URL, else a SQLite file beside local results (or in ~/.synthval)."""
    from synthval.results.store import default_url

    return flag or os.environ.get(RESULTS_DB_ENV) or default_url(results_uri)


def _add_db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help=f"SQLAlchemy URL of the results store (env {RESULTS_DB_ENV}; default: "
                        "<--results>.db beside a local --results folder, else ~/.synthval/results.db)")
    p.add_argument("--results", default=None, metavar="URI", help="folder of result records (for the default --db)")


def _add_results_commands(sub: Any) -> None:
    p = sub.add_parser("leaderboard", help="the results store as a table: sorted, filtered, deltas to a baseline")
    _add_db_options(p)
    p.add_argument("--recipe", default=None, help="only this recipe")
    p.add_argument("--dataset", dest="dataset_contains", default=None, metavar="TEXT",
                   help="only datasets whose URI contains TEXT")
    p.add_argument("--budget", dest="budgets", type=int, action="append", default=None,
                   help="only this real budget (repeatable)")
    p.add_argument("--role", dest="roles", action="append", default=None,
                   help="only this role (repeatable): synthetic, synthetic+real, real (the real-only curve), "
                        "model (a given model), model+real")
    p.add_argument("--sort", default="real_equiv",
                   help="real_equiv (default), mAP, mAP50, mAR100, when, dataset, real_budget or recipe")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--baseline", default=None, metavar="DATASET", help="show metric deltas against this dataset")
    p.add_argument("--include-stale", action="store_true", help="also rows of an older test set or scoring")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--format", dest="output_format", default="table", choices=["table", "csv", "json"])
    p.add_argument("--out", default=None, metavar="URI", help="write the table there instead of printing it")
    p.add_argument("--airflow-url", default=None, help="Airflow UI base URL, for links to each run")
    p.add_argument("--tensorboard-url", default=None, help="TensorBoard server reading the data root")
    _add_common(p)

    p = sub.add_parser("discover", help="complete synthetic datasets under a root with no result yet")
    _add_db_options(p)
    p.add_argument("--root", default=None, metavar="URI", help="watched root: a local folder or gs:// prefix")
    p.add_argument("--dataset", dest="announced", action="append", default=[], metavar="URI",
                   help="an announced dataset, checked like the listed ones (repeatable)")
    p.add_argument("--marker", default="_SUCCESS",
                   help="file (relative path or glob) whose presence means a dataset is complete")
    p.add_argument("--recipe", required=True, help="recipe the results are published under")
    p.add_argument("--test-data", required=True, metavar="URI", help="the fetched real test set (local)")
    p.add_argument("--split", default="test")
    p.add_argument("--test-format", default="auto", choices=DATASET_FORMATS)
    p.add_argument("--real-dataset", required=True, metavar="URI",
                   help="the real dataset as publish records it (real=URI)")
    p.add_argument("--budget", dest="budgets", type=int, action="append", default=None,
                   help="real budgets each dataset is valued at (repeatable; default 0)")
    p.add_argument("--real-budget", dest="real_budgets", type=int, action="append", default=[],
                   help="budgets of the real-only curve (repeatable)")
    p.add_argument("--real-split", default=None,
                   help="split of --test-data the real budgets are drawn from: budgets above its size are clipped")
    p.add_argument("--limit", type=int, default=None, help="value at most this many datasets per run")
    _add_common(p)


def _run_results_command(args: argparse.Namespace) -> dict[str, Any]:
    db_url = _results_db_url(args.db, args.results)
    if args.command == "leaderboard":
        from synthval.steps.leaderboard import run_leaderboard

        return run_leaderboard(db_url, out_uri=args.out, output_format=args.output_format, recipe=args.recipe,
                               dataset_contains=args.dataset_contains, budgets=args.budgets, roles=args.roles,
                               include_stale=args.include_stale, sort=args.sort, descending=not args.ascending,
                               baseline=args.baseline, limit=args.limit, airflow_url=args.airflow_url,
                               tensorboard_url=args.tensorboard_url)
    from synthval.steps.discover import run_discover

    return run_discover(root_uri=args.root, db_url=db_url, recipe=args.recipe, test_data_uri=args.test_data,
                        real_dataset=args.real_dataset, split=args.split, announced=args.announced,
                        marker=args.marker, budgets=args.budgets or [0], real_budgets=args.real_budgets,
                        real_split=args.real_split, dataset_format=args.test_format, limit=args.limit)


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)

# Where each step writes. They are checked before the step starts (`storage.check_output`), so a file in
# the way, or a read-only or full disk, fails in a second rather than after hours, and nothing is written.
OUTPUT_FOLDERS = {
    "fetch": ("out",), "generate": ("out",), "train": ("checkpoint_dir", "tb_log_dir"),
    "finetune": ("checkpoint_dir", "tb_log_dir"), "evaluate": ("out", "tb_log_dir"), "publish": ("results",),
    "stats": ("out",),
}
OUTPUT_FILES_OR_FOLDERS = ("report", "compare")  # --out: an .html file, or a folder for the page
OUTPUT_FILES = ("leaderboard", "config-schema")  # --out: the table, the schema


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, an output of this command that cannot be written (OutputError, exit 2)."""
    from synthval.io import storage

    for name in OUTPUT_FOLDERS.get(args.command, ()):
        if getattr(args, name, None):
            storage.check_output(getattr(args, name), folder=True, what="--" + name.replace("_", "-"))
    out = getattr(args, "out", None)
    if out and args.command in OUTPUT_FILES_OR_FOLDERS + OUTPUT_FILES:
        folder = args.command in OUTPUT_FILES_OR_FOLDERS and not out.lower().endswith((".html", ".htm"))
        storage.check_output(out, folder=folder, what="--out")
    xcom = args.xcom_file or os.environ.get(XCOM_ENV)
    if xcom:
        storage.check_output(xcom, folder=False, what="--xcom-file")


def write_xcom(result: dict[str, Any], path: str | None, echo: bool = True) -> None:
    """Write the step's result where the KubernetesPodOperator sidecar (or the local backend) reads it.

    With no explicit path and no /airflow/xcom folder (a plain shell), the result is only printed
    (`echo`: also printed otherwise).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 speaks for the step
    explicit = path or os.environ.get(XCOM_ENV)
    target = explicit or DEFAULT_XCOM_FILE
    text = json.dumps(result, sort_keys=True)
    if echo:
        print(text, flush=True)
    if not explicit and not os.path.isdir(os.path.dirname(DEFAULT_XCOM_FILE)):
        return
    from synthval.io import storage

    storage.write_text(target, text + "\n")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # As a container's PID 1, Python ignores SIGTERM by default; a deleted pod would wait out its whole
    # grace period. Raising unwinds through the atomic writers, so nothing half-written is left.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        check_outputs(args)
        result = run_command(args)
        # `leaderboard` and `config-schema` without --out print their output to stdout; a result line after it
        # would break its CSV/JSON.
        write_xcom(result, args.xcom_file, echo=not (args.command in OUTPUT_FILES and args.out is None))
    except SynthvalError as exc:
        # One line, whatever the message quotes (a YAML parser's report spans several).
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"error: interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return 143 if str(exc).startswith("signal") else 130
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            log.exception("unexpected failure")
            return 1
        # A full, read-only or over-quota disk met by a write outside the storage layer (a copy, a
        # library's own file): the place the step writes to, not a bug. Its partial outputs are gone
        # (staging folders are removed on the way out).
        print(f"error: {exc.filename2 or exc.filename or 'an output'}: cannot be written ({exc.strerror})",
              file=sys.stderr)
        return 2
    except Exception:
        log.exception("unexpected failure")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
