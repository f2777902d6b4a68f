"""Where this deployment runs synthval steps (backend, image, cluster, storage), read once per process.

Every ``SYNTHVAL_<NAME>`` environment variable, and only when ``SYNTHVAL_BACKEND`` is not set in the
environment, the JSON Airflow Variable ``synthval_settings`` (``{"backend": "gke", "image": ..., ...}``,
keys in lower case). A deployment configured by environment therefore never touches the metadata
database while DAGs are parsed. `load_settings` checks the combination and says which setting is wrong.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("local", "kubernetes", "gke")

# Demo data made by the procedural generator, so the embedded default needs no network.
LOCAL_DEFAULT_SYNTHETIC = "generate://synthetic?num_images=400&image_size=192&seed=0"
LOCAL_DEFAULT_REAL = "generate://real-proxy?num_images=300&image_size=192&seed=1"
# The seed's named sources, resolved by `synthval fetch`.
CLUSTER_DEFAULT_SYNTHETIC = "synthdet-sample"
CLUSTER_DEFAULT_REAL = "groceries-real"


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
