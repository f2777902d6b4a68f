"""The one task factory behind every synthval DAG: settings, command lines, backends, TensorBoard link.

A DAG step is one `synthval <step> ...` command line. `synthval_task(step, argv, ...)` turns it into
an Airflow task on the backend the deployment picks, and DAG files never branch on the backend:

- ``local``: the command runs as a child process of the worker (`SynthvalLocalOperator`), with
  ``SYNTHVAL_XCOM_FILE`` pointing at a temporary file whose JSON becomes the task's XCom, the same
  contract as the pod's ``/airflow/xcom/return.json`` sidecar, and with only the environment
  variables a step needs (`step_environment`);
- ``kubernetes``: a `KubernetesPodOperator` running the shared training image in the cluster that
  Airflow runs in (or any cluster its Kubernetes connection reaches);
- ``gke``: a `GKEStartPodOperator` with the same pod, for an Airflow outside the GKE cluster.

**Conf is data, never command line.** An argv is a list of items (`Argv`): a string is a template that
renders to exactly one argument whatever the params hold (the DAGs render templates as strings, never
as native objects, so a param holding ``"['test', '--log-level', 'DEBUG']"`` stays that one string);
`Flag` renders its value into one ``--flag=value`` argument (so a value starting with ``-`` cannot
pass for a flag); `ParamFlag` turns an optional or list param into zero, one or one-per-item
``--flag=value``; `Computed` lists arguments built in Python from the params. Nothing is ever split,
spliced or parsed out of a rendered string.

Settings are read once per process when a DAG file is parsed: every ``SYNTHVAL_<NAME>`` environment
variable, and only when ``SYNTHVAL_BACKEND`` is not set in the environment, the JSON Airflow Variable
``synthval_settings`` (``{"backend": "gke", "image": ..., ...}``, keys in lower case). A deployment
configured by environment therefore never touches the metadata database while parsing.

This module must stay cheap to import and to parse DAGs with (Airflow's guideline: well under a
second per file): no torch, no synthval, and no Kubernetes client or provider on any backend. A pod
step is a light operator until it runs; `synthval_pods` builds the provider's operator then.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperator, BaseOperatorLink

BACKENDS = ("local", "kubernetes", "gke")
XCOM_FILE_ENV = "SYNTHVAL_XCOM_FILE"  # read by synthval.cli
USIM_TOKEN_ENV = "USIM_ACCESS_TOKEN"  # read by synthval.cli
USIM_TOKEN_FILE_ENV = "USIM_ACCESS_TOKEN_FILE"  # read by synthval.cli
RESULTS_DB_ENV = "SYNTHVAL_RESULTS_DB_URL"  # read by synthval.cli
# The steps that read or write the results store; on a pod backend their pods get its URL from a Secret.
RESULTS_STORE_STEPS = ("publish", "discover", "leaderboard")
# The steps that can run on several nodes (the `nodes` param; dags/synthval_jobs.py).
MULTINODE_STEPS = ("train", "finetune")

# Demo data made by the procedural generator, so the embedded default needs no network.
LOCAL_DEFAULT_SYNTHETIC = "generate://synthetic?num_images=400&image_size=192&seed=0"
LOCAL_DEFAULT_REAL = "generate://real-proxy?num_images=300&image_size=192&seed=1"
# The seed's named sources, resolved by `synthval fetch`.
CLUSTER_DEFAULT_SYNTHETIC = "synthdet-sample"
CLUSTER_DEFAULT_REAL = "groceries-real"


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class StepProfile:
    """What one step asks of a pod: CPU and memory requests, time, retries.

    Memory is also the limit (memory cannot be taken back, so a pod must not count on more than it
    asked for). CPU has no limit: the request reserves the cores and a step may use idle ones on top.
    Data-loader workers are bursty; a CPU limit (a CFS quota) throttles them even on an idle node, and
    the GPU then waits for batches.
    """

    cpu: str
    memory: str
    timeout: timedelta
    retries: int
    uses_gpu: bool = False


# Requests per step; a GPU step's CPU and memory are per GPU. Sized for a g2-standard-12 (1 x L4,
# 12 vCPU, 48 GB) node per GPU, leaving room for the kubelet.
STEP_PROFILES: dict[str, StepProfile] = {
    "fetch": StepProfile("2", "8Gi", timedelta(hours=6), retries=3),
    "generate": StepProfile("2", "4Gi", timedelta(hours=2), retries=1),
    "train": StepProfile("8", "40Gi", timedelta(hours=48), retries=3, uses_gpu=True),
    "finetune": StepProfile("8", "40Gi", timedelta(hours=24), retries=3, uses_gpu=True),
    "evaluate": StepProfile("6", "24Gi", timedelta(hours=6), retries=2, uses_gpu=True),
    "publish": StepProfile("500m", "1Gi", timedelta(minutes=30), retries=2),
    "version": StepProfile("100m", "256Mi", timedelta(minutes=10), retries=0),
}
# Any other subcommand (report, leaderboard, discover, ...) runs with this one.
DEFAULT_PROFILE = StepProfile("1", "4Gi", timedelta(hours=2), retries=1)


def step_profile(step: str) -> StepProfile:
    """The resources and retry policy of a `synthval <step>` task."""
    return STEP_PROFILES.get(step, DEFAULT_PROFILE)


@dataclass(frozen=True)
class Settings:
    """Deployment settings; `load_settings()` documents where each comes from."""

    backend: str = "local"
    data_root: str = ""
    image: str = "ghcr.io/synthval/synthval"
    image_tag: str = ""
    namespace: str = "synthval"
    service_account: str | None = "synthval"
    kubernetes_conn_id: str = "kubernetes_default"
    gpu_node_pool: str | None = "gpu-pool"
    gpu_accelerator: str | None = None
    cpu_node_pool: str | None = None
    storage_class: str | None = None
    data_pvc: str | None = None
    shm_size: str = "16Gi"
    startup_timeout_s: int = 1800
    usim_secret: str = "usim-access-token"
    usim_secret_key: str = "token"
    usim_conn_id: str = "usim_default"
    results_db_secret: str | None = None
    results_db_secret_key: str = "url"
    tensorboard_url: str | None = None
    gke_project: str | None = None
    gke_location: str | None = None
    gke_cluster: str | None = None
    gcp_conn_id: str = "google_cloud_default"
    kueue_queue: str | None = None
    cluster_domain: str = "cluster.local"
    default_synthetic: str = LOCAL_DEFAULT_SYNTHETIC
    default_real: str = LOCAL_DEFAULT_REAL
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pod_backend(self) -> bool:
        return self.backend in ("kubernetes", "gke")

    @property
    def default_preset(self) -> str:
        return "gpu" if self.is_pod_backend else "cpu-demo"

    @property
    def default_gpus(self) -> int:
        return 1 if self.is_pod_backend else 0


class SettingsError(ValueError):
    """A deployment setting is missing or wrong; the message names it and what is accepted."""


def _installed_version() -> str:
    # Reads the installed distribution's metadata only; `synthval` itself is never imported here.
    from importlib import metadata

    try:
        return metadata.version("synthval")
    except metadata.PackageNotFoundError:
        return ""


def _variable_settings() -> dict[str, Any]:
    from airflow.sdk import Variable

    value = Variable.get("synthval_settings", default=None, deserialize_json=True)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError("Airflow Variable synthval_settings must be a JSON object of settings")
    return {str(k).lower(): v for k, v in value.items()}


@functools.cache
def load_settings() -> Settings:
    """Return the deployment settings: env ``SYNTHVAL_<NAME>``, else Variable ``synthval_settings``.

    Names (env, or lower-case key of the Variable): BACKEND (local | kubernetes | gke), DATA_ROOT (root
    URI of every run's outputs; local default ``~/synthval-data``), IMAGE, IMAGE_TAG (never
    ``latest``; default: the installed synthval version), NAMESPACE, SERVICE_ACCOUNT,
    KUBERNETES_CONN_ID, GPU_NODE_POOL, GPU_ACCELERATOR, CPU_NODE_POOL, STORAGE_CLASS, DATA_PVC,
    SHM_SIZE, STARTUP_TIMEOUT_S, USIM_SECRET, USIM_SECRET_KEY, USIM_CONN_ID, RESULTS_DB_SECRET (the
    Kubernetes Secret, in the task namespace, whose key RESULTS_DB_SECRET_KEY holds the results store's
    URL: required on a pod backend, where a pod's own disk is deleted with it), RESULTS_DB_SECRET_KEY,
    TENSORBOARD_URL, GKE_PROJECT, GKE_LOCATION, GKE_CLUSTER, GCP_CONN_ID, KUEUE_QUEUE (the LocalQueue
    that admits training Jobs; unset: no Kueue), CLUSTER_DOMAIN (for the pods' DNS names),
    DEFAULT_SYNTHETIC, DEFAULT_REAL. An empty value means "not set".
    """
    names = [f for f in Settings.__dataclass_fields__ if f != "extra"]
    from_env = {n: os.environ[f"SYNTHVAL_{n.upper()}"] for n in names if os.environ.get(f"SYNTHVAL_{n.upper()}")}
    values: dict[str, Any] = {} if "backend" in from_env else _variable_settings()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SettingsError(f"Variable synthval_settings: unknown setting {unknown[0]!r}; known: {', '.join(names)}")
    values = {k: v for k, v in values.items() if v not in (None, "")}
    values.update(from_env)

    backend = str(values.get("backend", "local")).lower()
    if backend not in BACKENDS:
        raise SettingsError(f"SYNTHVAL_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}")
    values["backend"] = backend
    pod = backend != "local"
    if "startup_timeout_s" in values:
        try:
            values["startup_timeout_s"] = int(values["startup_timeout_s"])
        except ValueError:
            value = values["startup_timeout_s"]
            raise SettingsError(f"SYNTHVAL_STARTUP_TIMEOUT_S={value!r}: expected a number of seconds") from None
    values.setdefault("image_tag", _installed_version())
    if pod and not values["image_tag"]:
        raise SettingsError("SYNTHVAL_IMAGE_TAG is not set and synthval is not installed to take its version from")
    if str(values["image_tag"]).lower() == "latest":
        raise SettingsError("SYNTHVAL_IMAGE_TAG=latest: pin a version tag, so a retry runs the same code")
    if "data_root" not in values:
        if not pod:
            values["data_root"] = "~/synthval-data"
        elif values.get("data_pvc"):
            values["data_root"] = "/data/synthval"
        else:
            raise SettingsError(
                f"SYNTHVAL_DATA_ROOT is not set: with SYNTHVAL_BACKEND={backend} every pod reads and writes "
                "through it, so set a gs:// URI (or SYNTHVAL_DATA_PVC, a ReadWriteMany claim mounted at /data)"
            )
    root = str(values["data_root"])
    # A local root is made absolute: outputs must not depend on the worker's working folder (and the
    # output_root param accepts only absolute paths and URIs).
    values["data_root"] = os.path.abspath(os.path.expanduser(root)) if "://" not in root else root.rstrip("/")
    values.setdefault("default_synthetic", CLUSTER_DEFAULT_SYNTHETIC if pod else LOCAL_DEFAULT_SYNTHETIC)
    values.setdefault("default_real", CLUSTER_DEFAULT_REAL if pod else LOCAL_DEFAULT_REAL)
    if backend == "gke":
        missing = [n for n in ("gke_project", "gke_location", "gke_cluster") if not values.get(n)]
        if missing:
            raise SettingsError(f"SYNTHVAL_BACKEND=gke needs SYNTHVAL_{missing[0].upper()}")
    if pod and not values.get("results_db_secret"):
        raise SettingsError(
            f"SYNTHVAL_RESULTS_DB_SECRET is not set: with SYNTHVAL_BACKEND={backend} the publish and discover pods "
            "need the results store's URL, or they write into a pod's disk that is deleted with it. Name a Secret "
            "of the task namespace holding it: kubectl -n <namespace> create secret generic synthval-results-db "
            "--from-literal=url=postgresql+psycopg://USER:PASSWORD@HOST/DB"
        )
    return Settings(**values)


# ---------------------------------------------------------------------------------------------
# Command lines: conf is data


def format_arg(value: Any) -> str:
    """One argument's text. Booleans as true/false; small floats in fixed notation (PyYAML reads "1e-05"
    as a string). Anything that is not one value (None, a list, a mapping) is a bug in the DAG."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            text = f"{value:.15f}".rstrip("0").rstrip(".")
        return text
    if isinstance(value, (str, int)):
        return str(value)
    raise TypeError(f"a command-line argument must be one value, got {value!r}")


@dataclass(frozen=True)
class Flag:
    """``--flag=value`` as one argument; ``value`` is a template or a mapped task group's argument.

    The ``=`` form keeps a value that starts with ``-`` a value: ``--split=--log-level`` sets the split.
    """

    flag: str
    value: Any

    def __repr__(self) -> str:
        return f"{self.flag}={self.value}"


@dataclass(frozen=True)
class ParamFlag:
    """``--flag=value`` per value of the param ``param``: none when it is unset (None, "", []), one per
    item when it is a list."""

    flag: str
    param: str

    def __repr__(self) -> str:
        return f"{self.flag}=<each of params.{self.param}>"


@dataclass(frozen=True)
class Computed:
    """Arguments built in Python from the run's context: ``fn(context)`` returns a list, one argument per
    item (strings as they are, numbers and booleans by `format_arg`)."""

    fn: Callable[[Any], list[Any]]

    def __repr__(self) -> str:
        return f"<{self.fn.__name__}()>"


class Argv:
    """A `synthval` command line as a task's ``argv`` template field: a list of items (see the module
    docstring). Airflow renders a callable template field by calling it with the run's context; this
    returns the command line as a list of strings, which is what the task then holds and the UI shows.
    """

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)

    def __call__(self, *, context: Any, jinja_env: Any = None) -> list[str]:
        return render_argv(self.items, context, jinja_env)

    def serialize(self) -> list[str]:
        """The un-rendered command line, as the serialized DAG (and the UI before a run) shows it."""
        return [item if isinstance(item, str) else repr(item) for item in self.items]

    def __repr__(self) -> str:
        return f"Argv({self.serialize()!r})"


def render_argv(items: list[Any], context: Any, jinja_env: Any = None) -> list[str]:
    """Render argv ``items`` for a run: each string and each `Flag` to exactly one argument."""
    from airflow.sdk.definitions._internal.templater import render_template_to_string

    env = jinja_env or context["dag"].get_template_env()

    def value_of(item: Any) -> Any:
        if isinstance(item, str):
            return render_template_to_string(env.from_string(item), context)
        resolve = getattr(item, "resolve", None)  # an argument of a mapped task group
        return resolve(context) if resolve is not None else item

    argv: list[str] = []
    for item in items:
        if isinstance(item, Flag):
            argv.append(f"{item.flag}={format_arg(value_of(item.value))}")
        elif isinstance(item, ParamFlag):
            argv += param_flags(item.flag, context["params"].get(item.param))
        elif isinstance(item, Computed):
            argv += [format_arg(value) for value in item.fn(context)]
        else:
            argv.append(format_arg(value_of(item)))
    return argv


def param_flags(flag: str, value: Any) -> list[str]:
    """``[flag=value]``, one per item of a list, nothing for an unset value (None, "", [])."""
    if value is None or value == "" or value == []:
        return []
    return [f"{flag}={format_arg(v)}" for v in (value if isinstance(value, list) else [value])]


def set_flags(overrides: Any = (), **keys: Any) -> list[str]:
    """``--set=key=value`` for each set keyword (dots as ``__``), then for each "key=value" override."""
    flags = [f"--set={key.replace('__', '.')}={format_arg(value)}"
             for key, value in keys.items() if value is not None and value != ""]
    return flags + [f"--set={format_arg(override)}" for override in overrides or ()]


def config_flags(params: Any, prefix: str = "") -> list[str]:
    """The training config flags from the DAG params: preset, model, epochs, lr, batch size, overrides.

    With ``prefix="finetune_"`` the fine-tune params (``finetune_epochs`` ...) are used; an empty
    fine-tune epochs or learning rate leaves the preset's fine-tuning value (`synthval finetune`
    lowers the rate), never the training one. ``finetune_overrides`` come after ``overrides``.
    """

    def pick(name: str) -> Any:
        if not prefix:
            return params.get(name)
        value = params.get(prefix + name)
        own_only = name in ("epochs", "learning_rate")
        return value if value not in (None, "") or own_only else params.get(name)

    overrides = list(params.get("overrides") or []) + (list(params.get(prefix + "overrides") or []) if prefix else [])
    return [f"--preset={format_arg(params['preset'])}", *set_flags(
        overrides, model__name=pick("model"), epochs=pick("epochs"), optimizer__lr=pick("learning_rate"),
        data__batch_size=pick("batch_size"))]


def training_config(context: Any) -> list[str]:
    """`config_flags` of a run's params (a `Computed` item of train steps)."""
    return config_flags(context["params"])


def finetune_config(context: Any) -> list[str]:
    """`config_flags` of a run's fine-tuning params (a `Computed` item of fine-tune steps)."""
    return config_flags(context["params"], prefix="finetune_")


def evaluation_config(context: Any) -> list[str]:
    """``--set`` flags of a run's evaluation params (batch_size, overrides)."""
    params = context["params"]
    return set_flags(params.get("overrides"), batch_size=params.get("batch_size"))


# ---------------------------------------------------------------------------------------------
# Templating helpers (registered as DAG macros by `recipe_dag`); each returns one string


def run_slug(run_id: str) -> str:
    """Return a run id made safe as one path segment of any URI scheme.

    ``manual__2026-11-24T14:20:42.222917+00:00`` -> ``manual__2026-11-24T14-20-42.222917``.
    """
    run_id = re.sub(r"\+00:?00$", "", run_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")


def _root_uri(base: str, context: Any) -> str:
    return f"{str(base).rstrip('/')}/{context['dag'].dag_id}/{run_slug(context['run_id'])}"


def _pass_context(fn):
    import jinja2

    return jinja2.pass_context(fn)


@_pass_context
def run_root(context: Any) -> str:
    """``<output_root>/<dag_id>/<run>``: every output of this run lives below it."""
    return _root_uri(context["params"]["output_root"], context)


@_pass_context
def checkpoint_dir(context: Any, step: str) -> str:
    """Stable per run and step, so a retried step finds its checkpoints and `--resume auto` continues."""
    base = context["params"].get("checkpoint_dir") or context["params"]["output_root"]
    suffix = "/checkpoints" if not context["params"].get("checkpoint_dir") else ""
    return f"{_root_uri(base, context)}{suffix}/{step}"


@_pass_context
def tb_log_dir(context: Any, step: str) -> str:
    """TensorBoard log dir of one step of this run."""
    base = context["params"].get("tb_log_dir") or context["params"]["output_root"]
    suffix = "/tensorboard" if not context["params"].get("tb_log_dir") else ""
    return f"{_root_uri(base, context)}{suffix}/{step}"


@_pass_context
def upstream(context: Any, task_id: str, key: str) -> Any:
    """``key`` of the JSON an upstream step pushed; fails naming the task and key when absent."""
    result = context["ti"].xcom_pull(task_ids=task_id)
    if not isinstance(result, dict) or result.get(key) in (None, ""):
        raise KeyError(f"upstream task {task_id!r} pushed no {key!r} in its XCom (got {result!r})")
    return result[key]


MACROS = {
    "run_root": run_root,
    "checkpoint_dir": checkpoint_dir,
    "tb_log_dir": tb_log_dir,
    "upstream": upstream,
}


# ---------------------------------------------------------------------------------------------
# TensorBoard link


def tensorboard_url(log_dir: str, dag_id: str | None = None, settings: Settings | None = None) -> str:
    """Return where a person looks at ``log_dir``.

    With TENSORBOARD_URL set (a TensorBoard serving the data root): that server, filtered to this
    run's path (TensorBoard run names are paths below its logdir). Otherwise the folder itself where a
    browser can open it (the Cloud Storage console for gs://), and no link for a local folder: a browser
    opens no file:// link from a web page.
    """
    settings = settings or load_settings()
    if not log_dir or "{{" in log_dir:
        return ""
    if settings.tensorboard_url:
        tail = log_dir
        if dag_id and f"/{dag_id}/" in log_dir:
            tail = dag_id + "/" + log_dir.split(f"/{dag_id}/", 1)[1]
        return f"{settings.tensorboard_url.rstrip('/')}/?runFilter={quote(re.escape(tail), safe='')}#timeseries"
    if log_dir.startswith(("gs://", "gcs://")):
        return "https://console.cloud.google.com/storage/browser/" + log_dir.split("://", 1)[1]
    if log_dir.startswith(("http://", "https://")):
        return log_dir
    return ""


class TensorBoardLink(BaseOperatorLink):
    """The "TensorBoard" button of a train/fine-tune/evaluate task.

    Airflow 3 calls ``get_link`` on the worker when the task ends, where the operator's templates are
    rendered, and stores the URL as an XCom that the UI reads under ``xcom_key``.
    """

    name = "TensorBoard"

    @property
    def xcom_key(self) -> str:
        return "_link_synthval_tensorboard"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return tensorboard_url(getattr(operator, "tb_log_dir", "") or "", getattr(ti_key, "dag_id", None))


class GKEPodLink(BaseOperatorLink):
    """The "Kubernetes Pod" button of a gke-backend task: the pod in the Cloud console.

    `GKEStartPodOperator` stores the pod's coordinates under the provider link's XCom key when it
    creates the pod; the provider's own link formats them. Declared here so that parsing a DAG never
    imports the Google provider.
    """

    name = "Kubernetes Pod"
    provider_link = "KubernetesEnginePodLink"  # in airflow.providers.google.cloud.links.kubernetes_engine
    key = "kubernetes_pod_conf"  # its key

    @property
    def xcom_key(self) -> str:
        return self.key

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        from airflow.providers.google.cloud.links import kubernetes_engine

        return getattr(kubernetes_engine, self.provider_link)().get_link(operator, ti_key=ti_key)


class GKEJobLink(GKEPodLink):
    """The "Kubernetes Job" button of a gke-backend training task that ran as a Job (dags/synthval_jobs.py)."""

    name = "Kubernetes Job"
    provider_link = "KubernetesEngineJobLink"
    key = "kubernetes_job_conf"


def check_conf(context: Any) -> None:
    """Fail, naming it, on a conf key that is no param of the DAG.

    Airflow's trigger (UI, CLI, REST API) validates the DAG's params but accepts keys it does not know;
    a typo such as ``{"epoch": 3}`` would otherwise train with the default silently. Every synthval
    step calls this before it starts anything, so such a run fails in its first tasks.
    """
    import difflib

    from airflow.sdk.exceptions import AirflowFailException

    dag_run, dag = context.get("dag_run"), context.get("dag")
    conf = getattr(dag_run, "conf", None) or {}
    if dag is None or not isinstance(conf, dict):
        return
    unknown = sorted(set(conf) - set(dag.params))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(dag.params), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AirflowFailException(
            f"conf key {unknown[0]!r} is not a param of {dag.dag_id}{hint}; nothing was run. Its params are: "
            f"{', '.join(sorted(dag.params))}")


# ---------------------------------------------------------------------------------------------
# Processes


def synthval_executable() -> str:
    """The `synthval` console script installed next to this Python, else `python -m synthval.cli`."""
    candidate = Path(sys.executable).with_name("synthval")
    return str(candidate) if candidate.exists() else ""


@dataclass(frozen=True)
class Rendezvous:
    """Where the torchrun agents of a multi-node step meet (c10d): ``host:port`` of node 0, a run id of
    the group, how long an agent waits for the others (and for node 0's store: pods of one Job can start
    minutes apart on a node pool that scales up), how often the group restarts as a whole."""

    endpoint: str
    run_id: str
    join_timeout_s: int = 600
    max_restarts: int = 2


def launch_command(argv: list[str], gpus: int, *, local: bool, nodes: int = 1,
                   rendezvous: Rendezvous | None = None) -> list[str]:
    """Return the process to start for ``argv`` (``["synthval", step, ...]``).

    More than one GPU launches one process per GPU through torchrun, which runs ``python -m
    synthval.cli`` in each. Locally the console script next to the worker's Python is used. With
    ``nodes`` > 1 this is one node's agent of ``nodes`` that meet at ``rendezvous`` (dags/synthval_jobs.py).
    """
    if argv[:1] != ["synthval"]:
        raise ValueError(f"a synthval step starts with 'synthval', got {argv[:2]!r}")
    torchrun = [sys.executable, "-m", "torch.distributed.run"] if local else ["torchrun"]
    if nodes > 1:
        if rendezvous is None:
            raise ValueError(f"{nodes} nodes need a rendezvous endpoint")
        return [*torchrun, "--nnodes", str(nodes), "--nproc-per-node", str(max(gpus, 1)),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous.endpoint, "--rdzv-id", rendezvous.run_id,
                "--rdzv-conf", f"join_timeout={rendezvous.join_timeout_s},read_timeout={rendezvous.join_timeout_s}",
                "--max-restarts", str(rendezvous.max_restarts), "-m", "synthval.cli", *argv[1:]]
    if gpus > 1:
        return [*torchrun, "--standalone", "--nproc-per-node", str(gpus), "-m", "synthval.cli", *argv[1:]]
    if local:
        exe = synthval_executable()
        return [exe, *argv[1:]] if exe else [sys.executable, "-m", "synthval.cli", *argv[1:]]
    return argv


# What a local step's process gets of the worker's environment: what any process needs to run, find its
# Python and reach storage, and nothing else. The worker's environment holds every AIRFLOW_CONN_* and
# AIRFLOW_VAR_*, the metadata database URL, and whatever the deployment put there for Airflow itself.
STEP_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    # CPU threads and accelerators (and CUDA_*, NCCL_* below)
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_HOME", "XDG_CACHE_HOME",
    # the network: proxies and CA bundles
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    # Google Cloud Storage: Application Default Credentials (a file path), the project, the emulator
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG", "STORAGE_EMULATOR_HOST",
)
STEP_ENV_PREFIXES = ("LC_", "CUDA_", "NCCL_")
# Settings the `synthval` CLI reads, each passed only to the steps that read it.
STEP_SETTINGS_ENV = {
    "fetch": ("SYNTHVAL_USIM_API",),
    "publish": ("SYNTHVAL_RESULTS_DB_URL",),
    "leaderboard": ("SYNTHVAL_RESULTS_DB_URL",),
    "discover": ("SYNTHVAL_RESULTS_DB_URL",),
}


def step_environment(step: str, environ: Any = None) -> dict[str, str]:
    """The environment of a local ``synthval <step>`` process, taken from ``environ`` (the worker's)."""
    environ = os.environ if environ is None else environ
    names = set(STEP_ENV) | set(STEP_SETTINGS_ENV.get(step, ()))
    env = {k: v for k, v in environ.items() if k in names or k.startswith(STEP_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# Local backend


class SynthvalLocalOperator(BaseOperator):
    """Run one ``synthval <step>`` command as a child process of the worker.

    The process gets `step_environment` plus ``SYNTHVAL_XCOM_FILE`` (a temporary file) and, for the
    Unity Simulation fetch, the token as a file; its output streams into the task log; the JSON it
    wrote becomes this task's XCom return value. On timeout, kill or failure the whole process group is
    terminated. Exit code 2 (bad input or config) fails without retrying.
    """

    template_fields = ("argv", "gpus", "nodes", "tb_log_dir")
    template_fields_renderers = {"argv": "py"}
    ui_color = "#e8f1fb"

    def __init__(self, *, step: str, argv: Argv, gpus: Any = 0, nodes: Any = 1, tb_log_dir: str | None = None,
                 usim_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.argv = argv
        self.gpus = gpus
        self.nodes = nodes
        self.tb_log_dir = tb_log_dir
        self.usim_token = usim_token
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The rendered command line, as `synthval ...` (the same for every backend)."""
        return rendered_command(self)

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        check_conf(context)
        if int(self.nodes or 1) > 1:
            raise AirflowFailException(
                f"nodes={self.nodes}: the local backend runs one process group on this machine; training on "
                "several nodes needs SYNTHVAL_BACKEND=kubernetes or gke (use `gpus` for several processes here)")
        argv = self.command()
        cmd = launch_command(argv, int(self.gpus or 0), local=True)
        with tempfile.TemporaryDirectory(prefix="synthval-task-") as tmp:
            xcom_file = os.path.join(tmp, "return.json")
            env = step_environment(self.step)
            env[XCOM_FILE_ENV] = xcom_file
            if self.usim_token:
                env[USIM_TOKEN_FILE_ENV] = self._write_usim_token(tmp)
            self.log.info("Running: %s", shlex.join(argv))
            rc = self._run(cmd, env)
            if rc != 0:
                message = f"synthval {self.step} exited with code {rc}"
                if rc == 2:
                    raise AirflowFailException(message + " (bad input or config: not retried)")
                raise AirflowException(message)
            try:
                with open(xcom_file, encoding="utf-8") as f:
                    return json.load(f)
            except FileNotFoundError:
                raise AirflowException(f"synthval {self.step} wrote no result to {XCOM_FILE_ENV}") from None

    def _write_usim_token(self, folder: str) -> str:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowFailException

        conn_id = load_settings().usim_conn_id
        try:
            token = BaseHook.get_connection(conn_id).password
        except Exception as exc:  # noqa: BLE001 - the connection API raises several types
            raise AirflowFailException(
                f"Unity Simulation token: Airflow connection {conn_id!r} is missing ({exc}); create it with "
                f"the token as its password"
            ) from None
        if not token:
            raise AirflowFailException(f"Unity Simulation token: connection {conn_id!r} has no password")
        path = os.path.join(folder, "usim-token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token)
        return path

    def _run(self, cmd: list[str], env: dict[str, str]) -> int:
        self._proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, text=True, errors="replace", bufsize=1,
        )
        try:
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                self.log.info("%s", line.rstrip("\n"))
            return self._proc.wait()
        finally:
            self._terminate()

    def _terminate(self, grace_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.log.warning("Stopping synthval %s (process group %d)", self.step, proc.pid)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def on_kill(self) -> None:
        self._terminate()


def rendered_command(task: Any) -> list[str]:
    """A rendered task's command line; before rendering there is none to run."""
    if isinstance(task.argv, Argv):
        raise RuntimeError(f"task {task.task_id!r}: its command line exists only once its templates are rendered")
    return list(task.argv)


# ---------------------------------------------------------------------------------------------
# Pod backends


class SynthvalPodTask(BaseOperator):
    """Run one ``synthval <step>`` command as a pod of the training image (kubernetes or gke backend).

    Light while DAGs are parsed: the provider's operator is built by `synthval_pods.pod_operator` from
    the rendered task when it runs, and this task hands execution, the trigger's re-entry and kills to
    it. That is a `KubernetesPodOperator` or `GKEStartPodOperator` (deferrable), or, for a training
    step of a run with ``nodes`` > 1 (or every training step when a Kueue queue is set), their
    `KubernetesJobOperator` counterpart running an Indexed Job (dags/synthval_jobs.py).
    """

    template_fields = ("argv", "gpus", "nodes", "tb_log_dir", "storage_gib", "image_tag")
    template_fields_renderers = {"argv": "py"}
    ui_color = "#e3f4e1"

    def __init__(self, *, step: str, argv: Argv, gpus: Any = 0, nodes: Any = 1, tb_log_dir: str | None = None,
                 storage_gib: Any = "{{ params.storage_gib }}", image_tag: Any = "{{ params.image_tag }}",
                 usim_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.argv = argv
        self.gpus = gpus
        self.nodes = nodes
        self.tb_log_dir = tb_log_dir
        self.storage_gib = storage_gib
        self.image_tag = image_tag
        self.usim_token = usim_token
        self._pod_operator: Any = None

    def command(self) -> list[str]:
        """The rendered command line, as `synthval ...` (the same for every backend)."""
        return rendered_command(self)

    def pod_operator(self) -> Any:
        """The provider's pod or Job operator for this rendered task (built once)."""
        if self._pod_operator is None:
            from synthval_pods import pod_operator

            self._pod_operator = pod_operator(self, load_settings())
        return self._pod_operator

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> Any:
        """The pod this task creates, as the provider builds it (`dry_run` leaves out the random suffix)."""
        return self.pod_operator().build_pod_request_obj(context, dry_run=dry_run)

    def execute(self, context: Any) -> Any:
        check_conf(context)
        return self.pod_operator().execute(context)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        """Where a deferred pod task resumes (`KubernetesPodOperator.trigger_reentry`)."""
        return self.pod_operator().trigger_reentry(context, event)

    def finish_job(self, context: Any, event: dict[str, Any]) -> Any:
        """Where a deferred training Job resumes (`synthval_jobs.SynthvalJobMixin.finish_job`): its Job
        operator, even if the settings that chose it (a Kueue queue) changed while the Job ran."""
        if not hasattr(self._pod_operator, "finish_job"):
            from synthval_pods import pod_operator

            self._pod_operator = pod_operator(self, load_settings(), as_job=True)
        return self._pod_operator.finish_job(context, event)

    def on_kill(self) -> None:
        if self._pod_operator is not None:
            self._pod_operator.on_kill()


# ---------------------------------------------------------------------------------------------
# The factory


def synthval_task(step: str, argv: list[Any], *, task_id: str | None = None, gpus: Any = 0, nodes: Any = None,
                  tb_log_dir: str | None = None, usim_token: bool = False, **kwargs: Any) -> BaseOperator:
    """Return the task that runs ``argv`` (``["synthval", step, ...]``, argv items) on the set backend.

    ``gpus`` (a number or template) applies to train/fine-tune/evaluate; with more than one, torchrun
    starts one process per GPU. ``nodes`` (train/fine-tune; a number or template) above 1 runs the
    step on that many pods of ``gpus`` GPUs each, as one Indexed Job (dags/synthval_jobs.py); the
    local backend refuses it. ``tb_log_dir`` feeds the TensorBoard link. ``usim_token`` gives the
    process the Unity Simulation token: from the Kubernetes Secret (env USIM_ACCESS_TOKEN via
    secretKeyRef) in a pod, from the Airflow connection (a 0600 file named by USIM_ACCESS_TOKEN_FILE)
    locally. Other keyword arguments go to the operator (trigger_rule, retries, ...).
    """
    if argv[:2] != ["synthval", step]:
        raise ValueError(f"argv of step {step!r} must start with ['synthval', {step!r}], got {argv[:2]!r}")
    settings = load_settings()
    profile = step_profile(step)
    common: dict[str, Any] = dict(
        task_id=task_id or step,
        step=step,
        argv=Argv(argv),
        gpus=gpus if profile.uses_gpu else 0,
        tb_log_dir=tb_log_dir,
        usim_token=usim_token,
        # A pod's failure is often the node's (preemption, eviction), worth retrying with --resume auto;
        # a local one is usually deterministic, so it is retried once.
        retries=profile.retries if settings.is_pod_backend else min(profile.retries, 1),
        retry_delay=timedelta(minutes=1),
        retry_exponential_backoff=True,
        execution_timeout=profile.timeout,
    )
    if nodes is not None:
        if step not in MULTINODE_STEPS:
            raise ValueError(f"step {step!r} runs on one node; nodes applies to {', '.join(MULTINODE_STEPS)}")
        common["nodes"] = nodes
    common.update(kwargs)
    links: tuple[BaseOperatorLink, ...] = (TensorBoardLink(),) if tb_log_dir else ()
    if settings.backend == "local":
        op: BaseOperator = SynthvalLocalOperator(**common)
    else:
        op = SynthvalPodTask(**common)
        if settings.backend == "gke":
            links += (GKEPodLink(), GKEJobLink()) if step in MULTINODE_STEPS else (GKEPodLink(),)
    if links:
        op.operator_extra_links = links
    return op
