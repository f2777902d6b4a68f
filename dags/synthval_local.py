"""The local backend: a synthval step as a child process of the Airflow worker, for a laptop or a
single machine with no cluster.

The process gets only the environment variables a step needs (`step_environment`), with
``SYNTHVAL_XCOM_FILE`` pointing at a temporary file whose JSON becomes the task's XCom: the same
contract as the pod's ``/airflow/xcom/return.json`` sidecar.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
from typing import Any

from synthval_conf import check_conf
from synthval_launch import RESULTS_DB_ENV, USIM_API_ENV, USIM_TOKEN_FILE_ENV, XCOM_FILE_ENV, launch_command
from synthval_operator import SynthvalStepOperator
from synthval_settings import load_settings

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
    "fetch": (USIM_API_ENV,),
    "publish": (RESULTS_DB_ENV,),
    "leaderboard": (RESULTS_DB_ENV,),
    "discover": (RESULTS_DB_ENV,),
}


def step_environment(step: str, environ: Any = None) -> dict[str, str]:
    """The environment of a local ``synthval <step>`` process, taken from ``environ`` (the worker's)."""
    environ = os.environ if environ is None else environ
    names = set(STEP_ENV) | set(STEP_SETTINGS_ENV.get(step, ()))
    env = {k: v for k, v in environ.items() if k in names or k.startswith(STEP_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env



class SynthvalLocalOperator(SynthvalStepOperator):
    """Run one ``synthval <step>`` command as a child process of the worker.

    The process gets `step_environment` plus ``SYNTHVAL_XCOM_FILE`` (a temporary file) and, for the
    Unity Simulation fetch, the token as a file; its output streams into the task log; the JSON it
    wrote becomes this task's XCom return value. On timeout, kill or failure the whole process group is
    terminated. Exit code 2 (bad input or config) fails without retrying.
    """

    ui_color = "#e8f1fb"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proc: subprocess.Popen | None = None

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
