"""The buttons of synthval tasks in the Airflow UI: TensorBoard, and on GKE the pod or Job console.

Declared here, cheap to import, so that parsing a DAG never imports the Google provider; the provider's
own link classes are used only when a button's URL is made.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperator, BaseOperatorLink

from synthval_settings import Settings, load_settings


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
