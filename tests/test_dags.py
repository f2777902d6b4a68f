"""The Airflow DAGs: they load, import no training code, have the recipes' task order, validate conf,
build command lines the CLI accepts, and (slow) run a recipe end to end on the local backend.

Airflow is pointed at a throwaway AIRFLOW_HOME (SQLite) before it is first imported.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"
PYTHON_BIN = Path(sys.executable).parent
# One throwaway Airflow home for every test module of this session, never the developer's own.
os.environ.setdefault("SYNTHVAL_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="synthval-airflow-test-"))
AIRFLOW_ENV = {
    "AIRFLOW_HOME": os.environ["SYNTHVAL_TEST_AIRFLOW_HOME"],
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
}
os.environ.update(AIRFLOW_ENV)
if str(DAGS) not in sys.path:
    sys.path.insert(0, str(DAGS))  # as Airflow's DAG bundle does for the DAG folder

DAG_IDS = {
    "train_on_synthdet_sample",
    "train_on_real_world_dataset",
    "train_on_synthetic_and_real_dataset",
    "train_on_synthetic_dataset_unity_simulation",
    "evaluate_the_model",
}
# Task -> its upstream tasks, per DAG: the recipes of the seed.
TASK_ORDER = {
    "train_on_synthdet_sample": {
        "fetch_synthetic": set(), "fetch_real": set(), "train": {"fetch_synthetic"},
        "evaluate": {"train", "fetch_real"}, "publish": {"evaluate"},
    },
    "train_on_real_world_dataset": {
        "fetch_real": set(), "train": {"fetch_real"}, "evaluate": {"train"}, "publish": {"evaluate"},
    },
    "train_on_synthetic_and_real_dataset": {
        "choose_start": set(), "fetch_synthetic": {"choose_start"}, "use_given_checkpoint": {"choose_start"},
        "fetch_real": set(), "train": {"fetch_synthetic"},
        "evaluate_synthetic": {"train", "use_given_checkpoint", "fetch_real"},
        "finetune": {"train", "use_given_checkpoint", "fetch_real"},
        "evaluate": {"finetune"}, "publish": {"evaluate"},
    },
    "train_on_synthetic_dataset_unity_simulation": {
        "fetch_synthetic": set(), "fetch_real": set(), "train": {"fetch_synthetic"},
        "evaluate": {"train", "fetch_real"}, "publish": {"evaluate"},
    },
    "evaluate_the_model": {"fetch_real": set(), "evaluate": {"fetch_real"}, "publish": {"evaluate"}},
}
# What each step pushes (the CLI's result JSON), as upstream XComs for rendering.
UPSTREAM_XCOMS = {
    "fetch_synthetic": {"dataset_uri": "gs://bucket/runs/data/synthetic", "format": "perception", "num_images": 400},
    "fetch_real": {"dataset_uri": "gs://bucket/runs/data/real", "format": "groceries", "num_images": 300},
    "train": {"checkpoint_uri": "gs://bucket/runs/checkpoints/train/checkpoint-000120.pt", "step": 120,
              "num_train_images": 760},
    "finetune": {"checkpoint_uri": "gs://bucket/runs/checkpoints/finetune/checkpoint-000040.pt", "step": 40,
                 "num_train_images": 76},
    "evaluate": {"metrics_uri": "gs://bucket/runs/eval/metrics.json", "summary": {"mAP": 0.1}},
    "evaluate_synthetic": {"metrics_uri": "gs://bucket/runs/eval/synthetic/metrics.json", "summary": {"mAP": 0.05}},
}
RUN_ID = "manual__2026-11-24T14:20:42.222917+00:00"
# Conf that each DAG needs beyond its defaults (required params).
REQUIRED_CONF = {
    "train_on_synthetic_dataset_unity_simulation": {"project_id": "proj-1", "run_execution_id": "yJ3kQ2x"},
    "evaluate_the_model": {"checkpoint": "synthetic-400k"},
}


class FakeTI:
    """The task instance as templates and pod operators read it, with canned upstream XComs."""

    def __init__(self, dag_id: str, task_id: str, xcoms: dict[str, Any]) -> None:
        self.dag_id, self.task_id, self.run_id = dag_id, task_id, RUN_ID
        self.try_number, self.map_index, self.start_date = 1, -1, None
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: Any = None, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get(task_ids)


def parse_dag_folder(monkeypatch: pytest.MonkeyPatch, backend: str = "local", **settings: str) -> Any:
    """Every file of dags/ parsed with these settings (env SYNTHVAL_<NAME>), as Airflow's dag processor
    does; the DagBag, import errors included."""
    from airflow.dag_processing.dagbag import DagBag

    import synthval_settings

    for key in [k for k in os.environ if k.startswith("SYNTHVAL_") and k != "SYNTHVAL_TEST_AIRFLOW_HOME"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    synthval_settings.load_settings.cache_clear()
    try:
        return DagBag(dag_folder=str(DAGS), safe_mode=False)
    finally:
        synthval_settings.load_settings.cache_clear()


def load_dags(monkeypatch: pytest.MonkeyPatch, backend: str = "local", **settings: str) -> dict[str, Any]:
    """Parse dags/ with these settings (env SYNTHVAL_<NAME>); return the DAGs by id."""
    bag = parse_dag_folder(monkeypatch, backend, **settings)
    assert bag.import_errors == {}, bag.import_errors  # every file in dags/, recipes or not
    assert DAG_IDS <= set(bag.dags), sorted(bag.dags)
    # The recipes of issue 3; other DAGs in the folder have their own tests.
    return {dag_id: dag for dag_id, dag in bag.dags.items() if dag_id in DAG_IDS}


def render(dag: Any, task: Any, conf: dict[str, Any] | None = None, xcoms: dict[str, Any] | None = None) -> Any:
    """Render a copy of ``task`` as a run with ``conf`` would; return the copy."""
    import copy

    merged = copy.deepcopy(dag.params)
    merged.update(conf or {})
    params = merged.validate()
    task = copy.deepcopy(task)
    ti = FakeTI(dag.dag_id, task.task_id, UPSTREAM_XCOMS if xcoms is None else xcoms)
    context = {"params": params, "dag": dag, "task": task, "run_id": RUN_ID, "ti": ti, "task_instance": ti}
    task.render_template_fields(context)
    task.test_context = context
    return task


def synthval_tasks_of(dag: Any) -> list[Any]:
    return [t for t in dag.tasks if hasattr(t, "command")]


def option(argv: list[str], flag: str) -> str:
    """The value of ``flag`` in a rendered argv (``--flag=value``); the last one if it repeats."""
    values = options(argv, flag)
    assert values, (flag, argv)
    return values[-1]


def options(argv: list[str], flag: str) -> list[str]:
    """Every value of ``flag`` in a rendered argv, in order."""
    return [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_dags() -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHVAL_DATA_ROOT", "/tmp/synthval-test-root")
        return load_dags(mp, "local", data_root="/tmp/synthval-test-root")


def test_every_dag_loads_with_its_file_name_and_docs(local_dags):
    assert set(local_dags) == DAG_IDS
    for dag_id, dag in local_dags.items():
        assert Path(dag.fileloc).stem == dag_id
        module_doc = ast.get_docstring(ast.parse(Path(dag.fileloc).read_text()), clean=False)
        assert dag.doc_md == module_doc and len(dag.doc_md) > 200, dag_id
        assert "synthval" in dag.tags
        for name in dag.params:
            assert dag.params.get_param(name).schema.get("section"), (dag_id, name)


def test_task_order_of_each_recipe(local_dags):
    for dag_id, expected in TASK_ORDER.items():
        dag = local_dags[dag_id]
        actual = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
        assert actual == expected, dag_id


@pytest.mark.parametrize("backend", ["local", "kubernetes", "gke"])
def test_parsing_imports_neither_torch_nor_synthval_nor_the_pod_providers(backend, tmp_path):
    script = f"""
DAG_IDS = {sorted(DAG_IDS)!r}
import sys, time
sys.path.insert(0, {str(DAGS)!r})
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
before = set(sys.modules)  # Airflow itself imports a few provider modules (airflow.exceptions)
bag = DagBag(dag_folder={str(DAGS)!r}, load_op_links=False)  # as the dag-processor parses
t2 = time.perf_counter()
assert not bag.import_errors, bag.import_errors
assert set(DAG_IDS) <= set(bag.dags), sorted(bag.dags)
# Training code, and on every backend the Kubernetes client and the pod providers: a pod is built
# only when its task runs (Airflow's parsing guideline: well under a second per file).
heavy = ("torch", "torchvision", "synthval", "kubernetes", "airflow.providers.cncf.kubernetes",
         "airflow.providers.google")
leaked = sorted(m for m in set(sys.modules) - before
                if m in ("synthval_pods", "synthval_jobs") or any(m == h or m.startswith(h + ".") for h in heavy))
print("LEAKED", leaked)
print(f"TIMES import_airflow={{t1 - t0:.2f}} parse_all_dags={{t2 - t1:.2f}}")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHVAL_")}
    env.update(AIRFLOW_ENV, SYNTHVAL_BACKEND=backend, SYNTHVAL_DATA_ROOT="gs://bucket/synthval",
               SYNTHVAL_RESULTS_DB_SECRET="synthval-results-db",
               SYNTHVAL_GKE_PROJECT="p", SYNTHVAL_GKE_LOCATION="l", SYNTHVAL_GKE_CLUSTER="c")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout, proc.stdout
    print(backend, re.search(r"TIMES .*", proc.stdout).group(0))


def test_the_trigger_form_marks_only_real_requirements_and_shows_no_null(local_dags):
    """Airflow's form marks a field required unless its schema type includes "null", and labels enum
    values as they are (None as "null") unless `values_display` names them (the Chromium check of the
    form itself is in tests/test_make_airflow.py)."""
    for dag in local_dags.values():
        for name in dag.params:
            param = dag.params.get_param(name)
            types = param.schema.get("type")
            types = [types] if isinstance(types, str) else types or []
            if param.value is None or param.value == []:  # optional: empty means "not set"
                assert "null" in types, (dag.dag_id, name, types)
            if None in (param.schema.get("enum") or []):
                assert param.schema.get("values_display", {}).get("null"), (dag.dag_id, name)


def test_tasks_carry_no_copy_of_the_params_yet_run_with_them(local_dags):
    """Each task gets the DAG's params at run time (what the task runner calls), not a copy at parse time."""
    from airflow.sdk.definitions.param import process_params

    import copy

    for parsed in local_dags.values():
        dag = copy.deepcopy(parsed)  # process_params sets the conf's values on the DAG's own Param objects
        for task in dag.tasks:
            assert not task.params, (dag.dag_id, task.task_id)
            params = process_params(dag, task, {"gpus": 3, **REQUIRED_CONF.get(dag.dag_id, {})},
                                    suppress_exception=False)
            assert set(params) == set(dag.params) and params["gpus"] == 3
            assert params["test_split"] == "test"


def test_contract_every_command_line_is_accepted_by_the_cli(local_dags, monkeypatch):
    """Every argv any DAG builds, with default and with non-default params, parses with the real parser."""
    from synthval.cli import get_parser

    parser = get_parser()
    variants = [{}, {"gpus": 2, "epochs": 3, "learning_rate": 1e-5, "batch_size": 2, "model": "tiny",
                     "overrides": ["max_steps=2", "model.min_size=96"], "real_count": 40, "real_split": "train_small",
                     "finetune_epochs": 1, "finetune_overrides": ["optimizer.lr=0.0001"],
                     "start_from_checkpoint": "synthetic-400k", "checkpoint_dir": "gs://other/ckpt",
                     "tb_log_dir": "gs://other/tb"}]
    checked = 0
    for dag_id, dag in local_dags.items():
        for variant in variants:
            conf = {k: v for k, v in {**REQUIRED_CONF.get(dag_id, {}), **variant}.items() if k in dag.params}
            for task in synthval_tasks_of(dag):
                argv = render(dag, task, conf).command()
                assert argv[0] == "synthval" and all(isinstance(a, str) and a for a in argv), argv
                assert not any("{{" in a or "None" == a for a in argv), argv
                args = parser.parse_args(argv[1:])
                assert args.command == task.step
                checked += 1
    assert checked >= 40


def test_command_lines_carry_upstream_uris_and_params(local_dags):
    dag = local_dags["train_on_synthetic_and_real_dataset"]
    conf = {"real_split": "train_small", "real_count": 40, "epochs": 3, "learning_rate": 1e-5,
            "overrides": ["max_steps=2"], "finetune_overrides": ["epochs=1"]}
    finetune = render(dag, dag.task_dict["finetune"], conf).command()
    root = "/tmp/synthval-test-root/train_on_synthetic_and_real_dataset/manual__2026-11-24T14-20-42.222917"
    assert finetune == [
        "synthval", "finetune", "--train-data=gs://bucket/runs/data/real", "--train-split=train_small",
        "--max-images=40", "--val-data=gs://bucket/runs/data/real", "--val-split=val",
        "--init-checkpoint=" + UPSTREAM_XCOMS["train"]["checkpoint_uri"],
        f"--checkpoint-dir={root}/checkpoints/finetune", f"--tb-log-dir={root}/tensorboard/finetune",
        # The training epochs and learning rate are not inherited: `synthval finetune` applies the
        # preset's fine-tuning rate unless finetune_learning_rate / finetune_epochs are given.
        "--resume=auto", "--preset=cpu-demo", "--set=max_steps=2", "--set=epochs=1",
    ]
    train = render(dag, dag.task_dict["train"], conf).command()
    assert train[train.index("--preset=cpu-demo"):] == [
        "--preset=cpu-demo", "--set=epochs=3", "--set=optimizer.lr=0.00001", "--set=max_steps=2"]
    tuned = render(dag, dag.task_dict["finetune"], {**conf, "finetune_learning_rate": 2e-4}).command()
    assert options(tuned, "--set")[0] == "optimizer.lr=0.0002"
    evaluate = render(dag, dag.task_dict["evaluate"], conf).command()
    assert option(evaluate, "--checkpoint") == UPSTREAM_XCOMS["finetune"]["checkpoint_uri"]
    publish = render(dag, dag.task_dict["publish"], conf).command()
    assert option(publish, "--metrics") == UPSTREAM_XCOMS["evaluate"]["metrics_uri"]
    # The real budget is what fine-tuning actually trained on, not the param it was asked for.
    assert option(publish, "--real-budget") == "76"
    assert option(publish, "--run-id") == RUN_ID


def test_start_from_checkpoint_skips_synthetic_training_and_uses_it(local_dags):
    dag = local_dags["train_on_synthetic_and_real_dataset"]
    conf = {"start_from_checkpoint": "gs://b/synthetic.pt"}
    xcoms = {k: v for k, v in UPSTREAM_XCOMS.items() if k not in ("train", "fetch_synthetic")}
    for task_id in ("finetune", "evaluate_synthetic"):
        argv = render(dag, dag.task_dict[task_id], conf, xcoms).command()
        flag = "--init-checkpoint" if task_id == "finetune" else "--checkpoint"
        assert option(argv, flag) == "gs://b/synthetic.pt"
    publish = render(dag, dag.task_dict["publish"], conf, xcoms).command()
    # A fine-tune of a given model is "model+real" on the leaderboard, never in the real-only curve.
    assert options(publish, "--dataset") == ["model=gs://b/synthetic.pt", f"real={dag.params['real_dataset']}"]
    full = render(dag, dag.task_dict["publish"], {}).command()
    assert [d.split("=", 1)[0] for d in options(full, "--dataset")] == ["synthetic", "real"]
    # The branch picks the visible skip path.
    choose = dag.task_dict["choose_start"]
    assert choose.python_callable(params={"start_from_checkpoint": "gs://b/synthetic.pt"}) == "use_given_checkpoint"
    assert choose.python_callable(params={"start_from_checkpoint": None}) == "fetch_synthetic"
    assert dag.task_dict["finetune"].trigger_rule == "none_failed_min_one_success"


def test_two_runs_never_share_an_output_folder(local_dags):
    dag = local_dags["train_on_synthdet_sample"]
    task = render(dag, dag.task_dict["train"])
    argv = task.command()
    other = dag.task_dict["train"]
    import copy

    other = copy.deepcopy(other)
    ti = FakeTI(dag.dag_id, "train", UPSTREAM_XCOMS)
    other.render_template_fields({"params": copy.deepcopy(dag.params).validate(), "dag": dag, "task": other,
                                  "run_id": "manual__2026-11-24T15:00:00+00:00", "ti": ti})
    dirs = lambda a: {option(a, f) for f in ("--checkpoint-dir", "--tb-log-dir")}  # noqa: E731
    assert not dirs(argv) & dirs(other.command())


def test_published_model_names_are_named_sources(local_dags):
    import synthval_params

    try:
        from synthval.io.sources import NAMED_SOURCES
    except ImportError:
        pytest.skip("synthval.io.sources.NAMED_SOURCES not there yet")
    assert set(synthval_params.PUBLISHED_MODELS) <= set(NAMED_SOURCES)


# ---------------------------------------------------------------------------------------------
# Params: bad conf is refused before a run (and so any task) exists


BAD_CONF = [
    ({"epochs": "many"}, "epochs"),
    ({"model": "resnet9000"}, "model"),
    ({"gpus": -1}, "gpus"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"overrides": ["not an override"]}, "overrides"),
    ({"image_tag": "latest"}, "image_tag"),
    ({"real_split": "train_huge"}, "real_split"),
    ({"checkpoint": "not-a-model"}, "checkpoint"),
    ({"project_id": ""}, "project_id"),
]


def _serialized(dag: Any) -> Any:
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_invalid_conf_is_rejected_naming_the_field(local_dags, dag_id):
    """The check `create_dagrun` makes (the trigger CLI, the REST API and `dags test` all go through it)."""
    from airflow.sdk.exceptions import ParamValidationError

    serialized = _serialized(local_dags[dag_id])
    required = REQUIRED_CONF.get(dag_id, {})
    serialized.params.deep_merge(required).validate()  # the defaults plus required params are valid
    tried = 0
    for conf, field in BAD_CONF:
        if field not in serialized.params:
            continue
        with pytest.raises(ParamValidationError, match=rf"param {field}\b"):
            serialized.params.deep_merge({**required, **conf}).validate()
        tried += 1
    assert tried >= 3
    if required:
        with pytest.raises(ParamValidationError, match=rf"param {next(iter(required))}\b"):
            serialized.params.deep_merge({}).validate()


@pytest.fixture(scope="session")
def airflow_db() -> dict[str, str]:
    """`airflow db migrate` once into the session's throwaway AIRFLOW_HOME; return the env to run airflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHVAL_") or k == "SYNTHVAL_TEST_AIRFLOW_HOME"}
    env.update(AIRFLOW_ENV, SYNTHVAL_BACKEND="local", PATH=f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(PYTHON_BIN / "airflow"), "db", "migrate"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


@pytest.mark.slow
def test_trigger_cli_rejects_bad_conf_and_creates_no_run(airflow_db, tmp_path):
    env = dict(airflow_db, SYNTHVAL_DATA_ROOT=str(tmp_path))
    airflow = str(PYTHON_BIN / "airflow")
    subprocess.run([airflow, "dags", "reserialize"], capture_output=True, text=True, env=env, timeout=300, check=True)
    proc = subprocess.run([airflow, "dags", "trigger", "train_on_real_world_dataset", "--conf", '{"epochs": "many"}'],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "Invalid input for param epochs" in proc.stdout + proc.stderr
    runs = subprocess.run([airflow, "dags", "list-runs", "train_on_real_world_dataset", "-o", "json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert runs.returncode == 0, runs.stderr[-2000:]
    assert json.loads(runs.stdout.strip().splitlines()[-1]) == []  # warnings may come before the JSON


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_come_from_env_else_the_variable(monkeypatch):
    import synthval_settings

    for key in [k for k in os.environ if k.startswith("SYNTHVAL_") and k != "SYNTHVAL_TEST_AIRFLOW_HOME"]:
        monkeypatch.delenv(key)
    synthval_settings.load_settings.cache_clear()
    # No SYNTHVAL_BACKEND in env: the Variable (here through Airflow's own env form of a Variable).
    monkeypatch.setenv("AIRFLOW_VAR_SYNTHVAL_SETTINGS", json.dumps(
        {"backend": "kubernetes", "data_root": "gs://b/r/", "image_tag": "1.2.3", "gpu_accelerator": "nvidia-l4",
         "results_db_secret": "synthval-results-db"}))
    s = synthval_settings.load_settings()
    assert (s.backend, s.data_root, s.image_tag, s.gpu_accelerator) == ("kubernetes", "gs://b/r", "1.2.3", "nvidia-l4")
    assert (s.default_synthetic, s.default_real, s.default_preset, s.default_gpus) == (
        "synthdet-sample", "groceries-real", "gpu", 1)
    # SYNTHVAL_BACKEND in env: env only, the Variable is not read.
    monkeypatch.setenv("SYNTHVAL_BACKEND", "local")
    synthval_settings.load_settings.cache_clear()
    s = synthval_settings.load_settings()
    assert s.backend == "local" and s.data_root == os.path.expanduser("~/synthval-data")
    assert s.default_synthetic.startswith("generate://synthetic") and s.default_preset == "cpu-demo"
    for bad, message in (({"SYNTHVAL_BACKEND": "slurm"}, "SYNTHVAL_BACKEND"),
                         ({"SYNTHVAL_IMAGE_TAG": "latest"}, "latest"),
                         ({"SYNTHVAL_BACKEND": "kubernetes"}, "SYNTHVAL_DATA_ROOT"),
                         ({"SYNTHVAL_BACKEND": "gke", "SYNTHVAL_DATA_ROOT": "gs://b"}, "SYNTHVAL_GKE_PROJECT")):
        with monkeypatch.context() as mp:
            for k, v in bad.items():
                mp.setenv(k, v)
            synthval_settings.load_settings.cache_clear()
            with pytest.raises(synthval_settings.SettingsError, match=message):
                synthval_settings.load_settings()
    synthval_settings.load_settings.cache_clear()


def test_tensorboard_link_points_at_the_task_log_dir(monkeypatch):
    import synthval_links
    from synthval_links import tensorboard_url
    from synthval_settings import Settings

    log_dir = "gs://b/synthval/train_on_synthdet_sample/manual__2026-11-24T14-20-42/tensorboard/train"
    served = Settings(backend="kubernetes", tensorboard_url="http://tb.example:6006/")
    url = tensorboard_url(log_dir, "train_on_synthdet_sample", served)
    assert url.startswith("http://tb.example:6006/?runFilter=train_on_synthdet_sample")
    assert url.endswith("#timeseries")
    assert tensorboard_url(log_dir, settings=Settings(backend="kubernetes")) == (
        "https://console.cloud.google.com/storage/browser/" + log_dir[5:])
    assert tensorboard_url("/data/tb/train", settings=Settings()) == ""  # no file:// link: a browser opens none
    assert tensorboard_url("{{ tb_log_dir('train') }}", settings=Settings()) == ""
    link = synthval_links.TensorBoardLink()
    op = type("Op", (), {"tb_log_dir": "/data/tb/train"})()
    monkeypatch.setattr(synthval_links, "load_settings", lambda: Settings())
    assert link.get_link(op, ti_key=None) == ""


def test_train_and_evaluate_tasks_carry_the_tensorboard_link(local_dags):
    from airflow.serialization.serialized_objects import DagSerialization

    for dag in local_dags.values():
        encoded = DagSerialization.to_dict(dag)["dag"]["tasks"]
        for item in encoded:
            op = item.get("__var", item)
            links = op.get("_operator_extra_links") or {}
            if op["task_id"] in ("train", "finetune", "evaluate", "evaluate_synthetic"):
                assert "TensorBoard" in links, (dag.dag_id, op["task_id"])
            else:
                assert "TensorBoard" not in links, (dag.dag_id, op["task_id"])


# ---------------------------------------------------------------------------------------------
# End to end on the local backend


TINY_CONF = {
    "synthetic_dataset": "generate://synthetic?num_images=12&image_size=96&seed=0",
    "real_dataset": "generate://real-proxy?num_images=40&image_size=96&seed=1",
    "real_split": "train_small",
    "preset": "cpu-demo",
    "batch_size": 4,
    "overrides": ["max_steps=2", "model.min_size=96", "model.max_size=96"],
}


def dags_test(env: dict[str, str], dag_id: str, conf: dict[str, Any]) -> tuple[str, float]:
    """Run `airflow dags test` as a user would; assert the run succeeded; return its log and seconds."""
    started = time.monotonic()
    proc = subprocess.run([str(PYTHON_BIN / "airflow"), "dags", "test", dag_id, "--conf", json.dumps(conf)],
                          capture_output=True, text=True, env=env, timeout=1200)
    elapsed = time.monotonic() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert re.search(rf"DagRun Finished: dag_id={dag_id}.*state=success", log), log[-8000:]
    return log, elapsed


def _xcoms(db: Path, dag_id: str) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT task_id, value FROM xcom WHERE dag_id = ? AND key = 'return_value'", (dag_id,)).fetchall()
    out = {}
    for task_id, value in rows:
        value = json.loads(value) if isinstance(value, (str, bytes)) else value
        out[task_id] = json.loads(value) if isinstance(value, str) else value
    return out


@pytest.mark.slow
def test_dags_test_synthetic_then_real_on_the_local_backend(airflow_db, tmp_path):
    env = dict(airflow_db, SYNTHVAL_DATA_ROOT=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    dag_id = "train_on_synthetic_and_real_dataset"
    log, elapsed = dags_test(env, dag_id, TINY_CONF)
    xcoms = _xcoms(Path(airflow_db["AIRFLOW_HOME"]) / "airflow.db", dag_id)
    train_ckpt = xcoms["train"]["checkpoint_uri"]
    finetune_ckpt = xcoms["finetune"]["checkpoint_uri"]
    assert Path(train_ckpt).is_file() and Path(finetune_ckpt).is_file()
    assert train_ckpt != finetune_ckpt
    run_root = tmp_path / "data" / dag_id
    assert Path(train_ckpt).is_relative_to(run_root) and Path(finetune_ckpt).is_relative_to(run_root)
    # train -> finetune -> evaluate through XCom: the command lines the tasks logged.
    assert re.search(rf"Running: synthval finetune .*--init-checkpoint={re.escape(train_ckpt)}", log)
    assert re.search(rf"Running: synthval evaluate --checkpoint={re.escape(finetune_ckpt)}", log)
    assert re.search(rf"Running: synthval evaluate --checkpoint={re.escape(train_ckpt)}", log)
    from synthval.scoring.coco_eval import SUMMARY_KEYS  # every key metrics.json documents

    assert {"mAP", "mAP50", "mAP75", "mAR100", "mean-average-precision"} <= set(SUMMARY_KEYS)
    for task_id in ("evaluate", "evaluate_synthetic"):
        metrics = json.loads(Path(xcoms[task_id]["metrics_uri"]).read_text())
        for key in SUMMARY_KEYS:
            assert key in metrics, (task_id, key)
        assert set(xcoms[task_id]["summary"]) >= {"mAP", "mAP50"}
    assert Path(xcoms["publish"]["result_uri"]).is_file()
    assert "use_given_checkpoint" not in xcoms  # the skipped path
    print(f"dags test {dag_id}: {elapsed:.1f} s")
