"""Airflow plugin: a "TensorBoard" entry in the Airflow UI's navigation, next to the per-task links.

Each synthval train, fine-tune and evaluate task carries a "TensorBoard" extra link to its own log
dir (`synthval_links.TensorBoardLink`, attached by the task factory). Airflow 3 resolves an operator's
links on the worker when the task ends, with its templates rendered, and the UI reads the stored URL;
so the per-task link needs no plugin registration, and registering it here would make the API
server call it with the unrendered operator. What a plugin adds is a way in for people who want the
TensorBoard server itself: set `SYNTHVAL_TENSORBOARD_URL` (the server that reads the data root, for
example `tensorboard --logdir gs://bucket/synthval`) on the API server and the menu shows it.
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

_TENSORBOARD_URL = os.environ.get("SYNTHVAL_TENSORBOARD_URL", "").strip()


class SynthvalPlugin(AirflowPlugin):
    name = "synthval"
    external_views = (
        [{"name": "TensorBoard", "href": _TENSORBOARD_URL, "destination": "nav", "category": "browse",
          "url_route": "synthval-tensorboard"}]
        if _TENSORBOARD_URL else []
    )
