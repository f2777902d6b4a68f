"""The Kueue manifests of deploy/kueue, checked without a cluster, and against the Jobs the DAGs build.

kubernetes-validate knows no custom resources, so each Kueue object is validated against a JSON schema
written down here from Kueue's published CRDs (kueue.x-k8s.io v1beta2, served since Kueue 0.15 and
identical to the deprecated v1beta1 for every field used here): the subset of the OpenAPI schema that
covers the fields our manifests use, with the CRDs' types, enums, patterns and list limits, strict on
unknown fields as `kubectl apply` (server-side field validation) is. The CRDs' CEL rules that concern
these fields are checked in Python (`cel_problems`). Then the manifests are checked against each
other, the deploy/k8s namespace and the Jobs the DAGs render: every resource a training pod asks for
is covered by the quota, the pods' node selector agrees with the flavor, and a 2-node run fits.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_deploy import helm_values, manifests, values_env

ROOT = Path(__file__).resolve().parent.parent
KUEUE_DIR = ROOT / "deploy" / "kueue"
API_VERSIONS = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern":
            rf"^(\+|-)?{NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{NUMBER}))?$"}]}
STOP_POLICY = {"type": "string", "enum": ["None", "Hold", "HoldAndDrain"]}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}


def _object(kind: str, spec: dict, namespaced: bool) -> dict:
    metadata = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
        "labels": LABELS, "annotations": LABELS,
        **({"namespace": {"type": "string", "pattern": DNS_SUBDOMAIN}} if namespaced else {})},
        "additionalProperties": False}
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"enum": list(API_VERSIONS)}, "kind": {"const": kind},
                           "metadata": metadata, "spec": spec}}


SCHEMAS = {
    "ResourceFlavor": _object("ResourceFlavor", {"type": "object", "additionalProperties": False, "properties": {
        "nodeLabels": {**LABELS, "maxProperties": 8},
        "nodeTaints": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "required": ["effect", "key"], "additionalProperties": False,
            "properties": {"effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                           "key": {"type": "string"}, "value": {"type": "string"}}}},
        "tolerations": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                           "key": {"type": "string"}, "operator": {"enum": ["Equal", "Exists"]},
                           "value": {"type": "string"}, "tolerationSeconds": {"type": "integer"}}}},
    }}, namespaced=False),
    "ClusterQueue": _object("ClusterQueue", {"type": "object", "additionalProperties": False, "properties": {
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "matchLabels": LABELS,
            "matchExpressions": {"type": "array", "items": {
                "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                "properties": {"key": {"type": "string"},
                               "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                               "values": {"type": "array", "items": {"type": "string"}}}}}}},
        "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
        "stopPolicy": STOP_POLICY,
        "preemption": {"type": "object", "additionalProperties": False, "properties": {
            "reclaimWithinCohort": {"enum": ["Never", "LowerPriority", "Any"]},
            "withinClusterQueue": {"enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]}}},
        "resourceGroups": {"type": "array", "maxItems": 16, "items": {
            "type": "object", "required": ["coveredResources", "flavors"], "additionalProperties": False,
            "properties": {
                "coveredResources": {"type": "array", "minItems": 1, "maxItems": 64, "items": {"type": "string"}},
                "flavors": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                    "type": "object", "required": ["name", "resources"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
                        "resources": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                            "type": "object", "required": ["name", "nominalQuota"], "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "nominalQuota": QUANTITY,
                                           "borrowingLimit": QUANTITY, "lendingLimit": QUANTITY}}}}}}}}},
    }}, namespaced=False),
    "LocalQueue": _object("LocalQueue", {"type": "object", "required": ["clusterQueue"], "additionalProperties": False,
                                         "properties": {"clusterQueue": {"type": "string", "pattern": DNS_SUBDOMAIN,
                                                                         "maxLength": 253},
                                                        "stopPolicy": STOP_POLICY}}, namespaced=True),
}


def kueue_objects(folder: Path = KUEUE_DIR) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def schema_errors(obj: dict) -> list[str]:
    schema = SCHEMAS.get(obj.get("kind"))
    if schema is None:
        return [f"{obj.get('kind')}: not a Kueue kind this project uses"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {'/'.join(map(str, e.absolute_path))}: "
            f"{e.message}" for e in validator.iter_errors(obj)]


def cel_problems(obj: dict) -> list[str]:
    """The CRDs' CEL rules on the fields used here."""
    problems = []
    if obj.get("kind") == "ClusterQueue":
        spec = obj["spec"]
        for group in spec.get("resourceGroups", []):
            covered = group["coveredResources"]
            for flavor in group["flavors"]:
                names = [r["name"] for r in flavor["resources"]]
                if names != covered:  # "each flavor MUST list all the resources ... in the same order"
                    problems.append(f"flavor {flavor['name']}: resources {names} are not coveredResources {covered}")
                cohort = spec.get("cohortName") or spec.get("cohort")
                if not cohort and any("borrowingLimit" in r for r in flavor["resources"]):
                    problems.append(f"flavor {flavor['name']}: borrowingLimit must be nil when cohort is empty")
    return problems


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def consistency_problems(objects: list[dict], namespace: dict) -> list[str]:
    """Names agree: the LocalQueue in the task namespace backs onto the ClusterQueue, whose selector
    admits that namespace and whose flavors exist."""
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    problems = []
    flavors = {f["metadata"]["name"] for f in by_kind.get("ResourceFlavor", [])}
    queues = {q["metadata"]["name"]: q for q in by_kind.get("ClusterQueue", [])}
    # The API server labels every namespace with its own name.
    name = namespace["metadata"]["name"]
    ns_labels = {**namespace["metadata"].get("labels", {}), "kubernetes.io/metadata.name": name}
    for local in by_kind.get("LocalQueue", []):
        if local["metadata"].get("namespace") != namespace["metadata"]["name"]:
            problems.append(f"LocalQueue {local['metadata']['name']} is not in the task namespace")
        target = queues.get(local["spec"]["clusterQueue"])
        if target is None:
            problems.append(f"LocalQueue {local['metadata']['name']}: no ClusterQueue {local['spec']['clusterQueue']}")
            continue
        selector = target["spec"].get("namespaceSelector")
        if selector is None or any(ns_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            problems.append(f"ClusterQueue {target['metadata']['name']} does not admit namespace "
                            f"{namespace['metadata']['name']}")
    for queue in queues.values():
        for group in queue["spec"].get("resourceGroups", []):
            for flavor in group["flavors"]:
                if flavor["name"] not in flavors:
                    problems.append(f"ClusterQueue {queue['metadata']['name']}: no ResourceFlavor {flavor['name']}")
    return problems


def admission_problems(objects: list[dict], pods: list[dict]) -> list[str]:
    """Whether Kueue can ever admit a Job of these pods: every resource they ask for is covered, their
    node selector agrees with a flavor's node labels, and together they fit the quota of that flavor."""
    problems = []
    (queue,) = [o for o in objects if o["kind"] == "ClusterQueue"]
    flavors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ResourceFlavor"}
    asked: dict[str, float] = {}
    for pod in pods:
        for container in pod["spec"]["containers"]:
            for name, value in (container.get("resources", {}).get("requests") or {}).items():
                asked[name] = asked.get(name, 0) + quantity(value)
            for name, value in (container.get("resources", {}).get("limits") or {}).items():
                if name not in (container["resources"].get("requests") or {}):  # extended resources: limit only
                    asked[name] = asked.get(name, 0) + quantity(value)
    for group in queue["spec"]["resourceGroups"]:
        missing = sorted(set(asked) - set(group["coveredResources"]))
        if missing:
            problems.append(f"resources not covered by the quota: {missing}")
        for entry in group["flavors"]:
            labels = flavors[entry["name"]]["spec"].get("nodeLabels", {})
            for pod in pods:
                selector = pod["spec"].get("nodeSelector") or {}
                clash = {k: (selector[k], v) for k, v in labels.items() if k in selector and selector[k] != v}
                if clash:
                    problems.append(f"flavor {entry['name']}: pod node selector disagrees: {clash}")
            for resource in entry["resources"]:
                if asked.get(resource["name"], 0) > quantity(resource["nominalQuota"]):
                    problems.append(f"flavor {entry['name']}: the Job asks for {asked[resource['name']]:g} "
                                    f"{resource['name']}, more than the quota {resource['nominalQuota']}")
    return problems


def test_kueue_manifests_match_the_crd_schema():
    objects = kueue_objects()
    assert {o["kind"] for o in objects} == set(SCHEMAS)
    for obj in objects:
        assert obj["apiVersion"] == API_VERSIONS[0]
        assert schema_errors(obj) == [] and cel_problems(obj) == []


def test_schema_and_rules_reject_broken_kueue_objects():
    objects = {o["kind"]: o for o in kueue_objects()}
    queue = copy.deepcopy(objects["ClusterQueue"])
    queue["spec"]["queueingStrategy"] = "LIFO"
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = "lots"
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"].pop()  # GPU quota missing for this flavor
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["borrowingLimit"] = 1
    queue["spec"]["cohrot"] = "typo"
    errors = "\n".join(schema_errors(queue) + cel_problems(queue))
    for needle in ("LIFO", "lots", "cohrot", "are not coveredResources", "borrowingLimit must be nil"):
        assert needle in errors
    local = copy.deepcopy(objects["LocalQueue"])
    del local["spec"]["clusterQueue"]
    local["apiVersion"] = "kueue.x-k8s.io/v1alpha1"
    errors = "\n".join(schema_errors(local))
    assert "clusterQueue" in errors and "v1alpha1" in errors
    flavor = copy.deepcopy(objects["ResourceFlavor"])
    flavor["spec"]["nodeLabels"] = {f"k{i}": "v" for i in range(9)}
    assert schema_errors(flavor)


def _namespace() -> dict:
    (namespace,) = [d for _, d in manifests() if d["kind"] == "Namespace"]
    return namespace


def test_kueue_objects_agree_with_each_other_and_the_task_namespace():
    assert consistency_problems(kueue_objects(), _namespace()) == []


def test_consistency_checker_rejects_dangling_names():
    objects = copy.deepcopy(kueue_objects())
    for obj in objects:
        if obj["kind"] == "LocalQueue":
            obj["metadata"]["namespace"] = "default"
        if obj["kind"] == "ClusterQueue":
            obj["spec"]["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": "other"}}
            obj["spec"]["resourceGroups"][0]["flavors"][0]["name"] = "nvidia-a100"
    problems = "\n".join(consistency_problems(objects, _namespace()))
    for needle in ("not in the task namespace", "does not admit namespace synthval", "no ResourceFlavor nvidia-a100"):
        assert needle in problems


@pytest.fixture(scope="module")
def training_pods(tmp_path_factory) -> dict[tuple[int, int], list[dict]]:
    """The pods of the train Job of train_on_synthdet_sample under the Helm values' settings plus the
    README's queue, for a few shapes (nodes, gpus): what Kueue would have to admit."""
    import json

    from test_dags import load_dags
    from test_jobs import KUBECONFIG, build_job

    import synthval_settings

    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(KUBECONFIG)
    env = values_env(helm_values())
    settings = {k.removeprefix("SYNTHVAL_").lower(): v for k, v in env.items() if k.startswith("SYNTHVAL_")}
    settings.pop("backend")
    shapes = {}
    with pytest.MonkeyPatch.context() as mp:
        dags = load_dags(mp, env["SYNTHVAL_BACKEND"], **settings, kueue_queue="synthval-training")
        mp.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                  json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}))
        mp.setenv("SYNTHVAL_BACKEND", env["SYNTHVAL_BACKEND"])
        for name, value in {**settings, "kueue_queue": "synthval-training"}.items():
            mp.setenv(f"SYNTHVAL_{name.upper()}", value)
        dag = dags["train_on_synthdet_sample"]
        for nodes, gpus in ((1, 1), (2, 1), (4, 1), (2, 4)):
            _, job, _, pod = build_job(dag, dag.task_dict["train"], {"nodes": nodes, "gpus": gpus})
            assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "synthval-training"
            shapes[(nodes, gpus)] = [pod] * job["spec"]["parallelism"]
        synthval_settings.load_settings.cache_clear()
    return shapes


def test_the_quota_admits_training_jobs_up_to_the_gpu_pool(training_pods):
    local_queue = next(o for o in kueue_objects() if o["kind"] == "LocalQueue")
    assert local_queue["metadata"]["name"] == "synthval-training"  # the name the README sets
    objects = kueue_objects()
    for shape in ((1, 1), (2, 1), (4, 1)):
        assert admission_problems(objects, training_pods[shape]) == [], shape


def test_admission_checker_rejects_what_kueue_would_never_admit(training_pods):
    objects = kueue_objects()
    # 2 nodes of 4 GPUs: 8 GPUs against a quota of 4 (a bigger node pool needs a bigger quota).
    assert any("more than the quota 4" in p for p in admission_problems(objects, training_pods[(2, 4)]))
    broken = copy.deepcopy(objects)
    for obj in broken:
        if obj["kind"] == "ClusterQueue":
            group = obj["spec"]["resourceGroups"][0]
            group["coveredResources"] = ["cpu", "memory"]
            group["flavors"][0]["resources"] = group["flavors"][0]["resources"][:2]
        if obj["kind"] == "ResourceFlavor":
            obj["spec"]["nodeLabels"]["cloud.google.com/gke-accelerator"] = "nvidia-tesla-t4"
    problems = "\n".join(admission_problems(broken, training_pods[(1, 1)]))
    assert "not covered by the quota: ['nvidia.com/gpu']" in problems and "nvidia-tesla-t4" in problems
