"""Conf is data, never command line: every string param of every DAG, fed list literals, flags, Jinja and
shell characters, is either refused at trigger (its schema) or ends up verbatim inside exactly the
arguments a plain value would, on the local backend (the process argv) and on the kubernetes backend
(the pod's command). Nothing is spliced, split, evaluated or parsed out of a value.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from typing import Any

import pytest
from test_dags import REQUIRED_CONF, UPSTREAM_XCOMS, FakeTI, RUN_ID, synthval_tasks_of

# Values an attacker or a careless paste could put in a string param.
HOSTILE = [
    "['test', '--log-level', 'DEBUG']",
    "--log-level=DEBUG",
    "-h",
    "{{ 7 * 7 }}",
    "{% raw %}x{% endraw %}",
    "$(touch /tmp/pwned); `id` | rm -rf * && echo ${HOME} > /tmp/x",
    "a b\tc' --xcom-file 'x",
    "ünïcødé-✓",
]
# Where a string must look like a path or URI, the same payloads behind a prefix, so some pass the schema.
PREFIXES = ["", "/data/", "gs://bucket/", "max_steps="]
BENIGN = {"": "benign", "/data/": "/data/benign", "gs://bucket/": "gs://bucket/benign", "max_steps=": "max_steps=7"}
# Each DAG and the params that have no value unless given.
DAG_IDS = ["train_on_synthdet_sample", "train_on_real_world_dataset", "train_on_synthetic_and_real_dataset",
           "train_on_synthetic_dataset_unity_simulation", "evaluate_the_model", "evaluate_new_synthetic_datasets"]


def slug(text: str) -> str:  # the discovery DAG names the fetched real set's folder by this hash
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:16]


@pytest.fixture(scope="module", params=["local", "kubernetes"])
def backend_dags(request):
    from airflow.dag_processing.dagbag import DagBag
    from test_dags import DAGS
    from test_pods import CLUSTER_SETTINGS

    import synthval_settings

    settings = {"data_root": "/srv/synthval"} if request.param == "local" else CLUSTER_SETTINGS
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHVAL_BACKEND", request.param)
        for name, value in settings.items():
            mp.setenv(f"SYNTHVAL_{name.upper()}", value)
        synthval_settings.load_settings.cache_clear()
        bag = DagBag(dag_folder=str(DAGS), safe_mode=False, load_op_links=False)
        assert not bag.import_errors, bag.import_errors
        yield request.param, {d: bag.dags[d] for d in DAG_IDS}, settings
        synthval_settings.load_settings.cache_clear()


def string_params(dag: Any) -> list[tuple[str, bool]]:
    """(name, is_list) of every param that takes a string, or a list of strings."""
    found = []
    for name in dag.params:
        schema = dag.params.get_param(name).schema
        types = schema.get("type") or []
        types = [types] if isinstance(types, str) else types
        if "string" in types or "anyOf" in schema and not types:
            found.append((name, False))
        elif "array" in types and (schema.get("items") or {}).get("type") == "string":
            found.append((name, True))
    return found


_SERIALIZED: dict[int, Any] = {}


def accepted(dag: Any, conf: dict[str, Any]) -> dict[str, Any] | None:
    """The run's params if a trigger with `conf` is accepted: Airflow's own check (each param's JSON schema, on
    the serialized DAG), made once for the defaults and then only for the params `conf` sets."""
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    if id(dag) not in _SERIALIZED:
        params = DagSerialization.from_dict(DagSerialization.to_dict(dag)).params
        defaults = {k: params.get_param(k).resolve() for k in params}  # None for a required param
        _SERIALIZED[id(dag)] = params, defaults
    params, defaults = _SERIALIZED[id(dag)]
    try:
        for name, value in conf.items():
            param = copy.copy(params.get_param(name))
            param.value = value
            param.resolve(raises=True)
    except Exception:  # noqa: BLE001 - jsonschema's ValidationError, as Airflow reports it
        return None
    return {**defaults, **conf}


def command_lines(dag: Any, params: dict[str, Any], backend: str, only: set[str] | None = None) -> dict[str, list[str]]:
    """Each synthval task's command as the process (local) or the pod's container (kubernetes) gets it."""
    out = {}
    for task in synthval_tasks_of(dag):
        if only is not None and task.task_id not in only:
            continue
        if task.get_closest_mapped_task_group() is not None:
            continue  # its arguments exist only once the group is expanded at run time
        ti = FakeTI(dag.dag_id, task.task_id, UPSTREAM_XCOMS)
        context = {"params": params, "dag": dag, "task": task, "run_id": RUN_ID, "ti": ti, "task_instance": ti}
        templates = {f: getattr(task, f) for f in task.template_fields}  # rendering replaces them in place
        try:
            task.render_template_fields(context, jinja_env=_env(dag))
            if backend == "local":
                out[task.task_id] = task.command()
            else:
                pod = _api_client().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
                main = pod["spec"]["containers"][0]
                out[task.task_id] = main["command"] + main["args"]
        finally:
            for name, value in templates.items():
                setattr(task, name, value)
            task.__dict__.pop("_pod_operator", None)
            task._pod_operator = None
    return out


@functools.cache
def _api_client() -> Any:
    """Serializes a pod as the Kubernetes API receives it (one client: each copies the global configuration)."""
    from kubernetes.client import ApiClient

    return ApiClient()


_ENVS: dict[int, Any] = {}


def _env(dag: Any) -> Any:
    """The DAG's Jinja environment, made once (Airflow makes one per task it renders)."""
    return _ENVS.setdefault(id(dag), dag.get_template_env())


def test_every_string_param_is_one_argument_or_refused(backend_dags, monkeypatch):
    from synthval.cli import get_parser

    import synthval_settings

    backend, dags, settings = backend_dags
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    synthval_settings.load_settings.cache_clear()
    parser = get_parser()
    checked = refused = 0
    for dag_id, dag in dags.items():
        required = REQUIRED_CONF.get(dag_id, {})
        names = string_params(dag)
        assert len(names) >= 5, (dag_id, names)
        for name, is_list in names:
            shapes = 0
            for prefix in PREFIXES:
                benign = BENIGN[prefix]
                base = accepted(dag, {**required, name: [benign] if is_list else benign})
                if base is None:
                    continue  # this param takes no value of this shape at all
                shapes += 1
                if backend != "local" and shapes > 1:
                    break  # a pod costs 0.2 s to build: its command is checked for one shape per param
                plain = command_lines(dag, base, backend)
                # The tasks the value reaches; the others' command lines cannot depend on it.
                reached = {t for t, argv in plain.items() if any(benign in a or slug(benign) in a for a in argv)}
                for payload in HOSTILE:
                    value = prefix + payload
                    params = accepted(dag, {**required, name: [value] if is_list else value})
                    if params is None:
                        refused += 1
                        continue
                    hostile = command_lines(dag, params, backend, only=reached)
                    for task_id, argv in hostile.items():
                        where = (dag_id, name, value, task_id)
                        # The same arguments as with a plain value, the value verbatim where it was.
                        swapped = [a.replace(value, benign).replace(slug(value), slug(benign)) for a in argv]
                        assert swapped == plain[task_id], where
                        assert "49" not in " ".join(argv) or "49" in " ".join(plain[task_id]), where
                        cli = argv[argv.index("synthval.cli") + 1:] if "synthval.cli" in argv else argv[1:]
                        args = parser.parse_args(cli)
                        assert (args.log_level, args.xcom_file) == ("INFO", None), where
                    checked += 1
    # Enough of each kind happened for the test to mean something.
    assert checked >= 60 and refused >= 60, (checked, refused)


@pytest.mark.parametrize("dag_id, conf, field", [
    # The issue's example, and Jinja in a split: refused at trigger, before anything runs.
    ("train_on_synthdet_sample", {"test_split": "['test','--log-level','DEBUG']"}, "test_split"),
    ("evaluate_the_model", {"checkpoint": "synthetic-400k", "test_split": "{{ 7*7 }}"}, "test_split"),
    ("train_on_real_world_dataset", {"real_split": "train --log-level DEBUG"}, "real_split"),
    ("evaluate_new_synthetic_datasets", {"real_split": "nope"}, "real_split"),
    ("train_on_synthdet_sample", {"synthetic_dataset": "--log-level=DEBUG"}, "synthetic_dataset"),
    ("train_on_synthdet_sample", {"output_root": "relative/out"}, "output_root"),
    ("train_on_synthdet_sample", {"real_dataset": "/data/real\x00x"}, "real_dataset"),
    ("train_on_synthdet_sample", {"overrides": ["max_steps=1\n--log-level DEBUG"]}, "overrides"),
])
def test_the_issues_injections_are_refused_at_trigger(backend_dags, dag_id, conf, field):
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    _, dags, _ = backend_dags
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dags[dag_id]))
    with pytest.raises(ParamValidationError, match=rf"param {field}\b"):
        serialized.params.deep_merge({**REQUIRED_CONF.get(dag_id, {}), **conf}).validate()


def test_a_list_literal_in_a_dataset_stays_one_argument(backend_dags, monkeypatch):
    """A value that passes its schema but looks like a list or a flag reaches the CLI as that one string."""
    from synthval.cli import get_parser

    backend, dags, settings = backend_dags
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    dag = dags["train_on_synthdet_sample"]
    value = "/data/['test', '--log-level', 'DEBUG']"
    params = accepted(dag, {"real_dataset": value})
    assert params is not None
    argv = command_lines(dag, params, backend)["fetch_real"]
    args = get_parser().parse_args(argv[1:])
    assert args.source == value and args.log_level == "INFO", argv
    assert [a for a in argv if value in a] == [value]
