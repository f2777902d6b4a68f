"""The local backend's operator: the XCom-file contract, log streaming, exit codes, cleanup, the token."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import test_dags  # noqa: F401 - sets up the throwaway AIRFLOW_HOME and the DAG folder on sys.path

import synthval_local
from synthval_argv import format_arg
from synthval_conf import check_conf
from synthval_launch import launch_command
from synthval_local import SynthvalLocalOperator
from synthval_params import config_flags

FAKE_TOKEN = "usim-FAKE-token-8d0a55"


def python_step(monkeypatch, code: str) -> None:
    """Make the operator launch ``python -c code`` instead of the synthval command."""
    monkeypatch.setattr(synthval_local, "launch_command", lambda argv, gpus, local: [sys.executable, "-c", code])


class RecordingLog:
    """Stands in for the task logger; keeps every formatted line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _record(self, msg: str, *args: object, **_: object) -> None:
        self.lines.append(msg % args if args else msg)

    info = warning = error = debug = exception = _record

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class RecordingOperator(SynthvalLocalOperator):
    @property
    def log(self) -> RecordingLog:  # type: ignore[override]
        return self.__dict__.setdefault("_recording_log", RecordingLog())


def operator(**kwargs) -> RecordingOperator:
    return RecordingOperator(task_id=kwargs.pop("task_id", "step"), step=kwargs.pop("step", "version"),
                             argv=kwargs.pop("argv", ["synthval", "version"]), **kwargs)


def test_runs_the_real_cli_and_returns_what_it_wrote():
    op = operator()
    result = op.execute({})
    from synthval import __version__

    assert result == {"version": __version__}
    assert "Running: synthval version" in op.log.text
    assert json.dumps(result, sort_keys=True) in op.log.text  # the process output streamed into the task log


def test_exit_code_2_fails_without_retry_and_1_with(monkeypatch):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    python_step(monkeypatch, "import sys; print('error: bad --set', file=sys.stderr); sys.exit(2)")
    with pytest.raises(AirflowFailException, match="code 2"):
        operator().execute({})
    python_step(monkeypatch, "import sys; sys.exit(1)")
    with pytest.raises(AirflowException, match="code 1") as info:
        operator().execute({})
    assert not isinstance(info.value, AirflowFailException)
    python_step(monkeypatch, "pass")
    with pytest.raises(AirflowException, match="wrote no result"):
        operator().execute({})


def test_on_kill_stops_the_whole_process_group(monkeypatch, tmp_path):
    pid_file = tmp_path / "child.pid"
    # The step starts a grandchild (like data loader workers) and hangs.
    python_step(monkeypatch, f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
open({str(pid_file)!r}, 'w').write(str(child.pid))
time.sleep(300)
""")
    op = operator()
    errors = []

    def run() -> None:
        try:
            op.execute({})
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    op.on_kill()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert op._proc.poll() is not None and errors  # the step failed: killed
    assert not alive(grandchild)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its new parent to reap it does not)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_timeout_kills_the_process(monkeypatch):
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout

    python_step(monkeypatch, "import time; time.sleep(300)")
    op = operator()
    started = time.monotonic()
    with pytest.raises(AirflowTaskTimeout), timeout(2):  # what the task runner wraps execute() in
        op.execute({})
    assert time.monotonic() - started < 30
    assert op._proc.poll() is not None


def test_unity_token_reaches_the_process_as_a_file_only(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_USIM_DEFAULT", json.dumps({"conn_type": "generic", "password": FAKE_TOKEN}))
    monkeypatch.setenv("USIM_ACCESS_TOKEN", "a-stale-token-in-the-worker-env")
    python_step(monkeypatch, """
import json, os, stat
path = os.environ['USIM_ACCESS_TOKEN_FILE']
result = {'token_ok': open(path).read() == %r, 'mode': oct(stat.S_IMODE(os.stat(path).st_mode)),
          'env_token': os.environ.get('USIM_ACCESS_TOKEN')}
json.dump(result, open(os.environ['SYNTHVAL_XCOM_FILE'], 'w'))
""" % FAKE_TOKEN)
    op = operator(step="fetch", argv=["synthval", "fetch", "usim://p/r", "--out", "/tmp/x"], usim_token=True)
    result = op.execute({})
    assert result == {"token_ok": True, "mode": "0o600", "env_token": None}
    assert op.log.lines and FAKE_TOKEN not in op.log.text


def test_unity_token_missing_connection_fails_clearly(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.delenv("AIRFLOW_CONN_USIM_DEFAULT", raising=False)
    python_step(monkeypatch, "pass")
    with pytest.raises(AirflowFailException, match="usim_default"):
        operator(step="fetch", argv=["synthval", "fetch", "usim://p/r", "--out", "/tmp/x"], usim_token=True).execute({})


def test_launch_command_uses_torchrun_for_several_gpus():
    argv = ["synthval", "train", "--train-data", "d"]
    assert launch_command(argv, 2, local=False) == [
        "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "synthval.cli", "train", "--train-data", "d"]
    assert launch_command(argv, 1, local=False) == argv
    local = launch_command(argv, 0, local=True)
    assert Path(local[0]).name == "synthval" and Path(local[0]).parent == Path(sys.executable).parent
    assert launch_command(argv, 4, local=True)[:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_number_formatting_and_config_flags():
    assert [format_arg(v) for v in (3, 1e-05, 2.5e-4, True, False, "a b")] == [
        "3", "0.00001", "0.00025", "true", "false", "a b"]
    for not_one in (None, [1], {"a": 1}):
        with pytest.raises(TypeError):
            format_arg(not_one)
    assert config_flags({"preset": "gpu", "model": None, "epochs": 3, "learning_rate": 2e-5,
                         "batch_size": None, "overrides": ["max_steps=5"]}) == [
        "--preset=gpu", "--set=epochs=3", "--set=optimizer.lr=0.00002", "--set=max_steps=5"]


SECRET = "made-up-secret-4f1d"


def test_a_step_gets_only_the_environment_it_needs(monkeypatch, tmp_path):
    """The worker's connections, variables and secrets stay with the worker; a step gets what it needs."""
    monkeypatch.setenv("AIRFLOW_CONN_RESULTS_DB", f"postgresql://u:{SECRET}@db/results")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"postgresql://u:{SECRET}@db/airflow")
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", f"postgresql+psycopg://u:{SECRET}@db/results")
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("TZ", "Europe/Paris")
    monkeypatch.setenv("HOME", str(tmp_path))
    report = """
import json, os
json.dump(dict(os.environ), open(os.environ['SYNTHVAL_XCOM_FILE'], 'w'))
"""
    python_step(monkeypatch, report)
    env = operator(step="train", argv=["synthval", "train"]).execute({})
    assert not [k for k, v in env.items() if SECRET in v or k.startswith("AIRFLOW")], env
    for name, value in (("PYTHONPATH", "/opt/extra"), ("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8"),
                        ("TZ", "Europe/Paris"), ("HOME", str(tmp_path)), ("PATH", os.environ["PATH"])):
        assert env.get(name) == value, name
    assert env["SYNTHVAL_XCOM_FILE"].endswith("return.json") and env["PYTHONUNBUFFERED"] == "1"
    # The results store's URL only reaches the steps that write or read the store.
    env = operator(step="publish", argv=["synthval", "publish"]).execute({})
    assert env["SYNTHVAL_RESULTS_DB_URL"] == os.environ["SYNTHVAL_RESULTS_DB_URL"]
    assert not [k for k in env if k.startswith("AIRFLOW") or k == "MY_API_TOKEN"]


def test_the_real_cli_runs_in_the_allowed_environment(monkeypatch):
    """What the allow-list keeps is enough for the real `synthval` (its Python, its packages, a locale)."""
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    assert operator().execute({})["version"]


def test_unknown_conf_key_fails_before_the_step_runs(monkeypatch):
    from airflow.sdk import DAG, Param
    from airflow.sdk.exceptions import AirflowFailException

    dag = DAG("probe", schedule=None, params={"epochs": Param(None, type=["null", "integer"])})
    run = type("Run", (), {"conf": {"epoch": 3}})()
    python_step(monkeypatch, "raise SystemExit('must not run')")
    with pytest.raises(AirflowFailException, match=r"conf key 'epoch' is not a param of probe \(did you mean "
                                                   r"'epochs'\?\); nothing was run. Its params are: epochs"):
        operator().execute({"dag": dag, "dag_run": run})
    check_conf({"dag": dag, "dag_run": type("Run", (), {"conf": {"epochs": 3}})()})
