"""`make airflow` as a user runs it: a real local Airflow 3 (api-server, scheduler, dag-processor, triggerer
as processes of their own, LocalExecutor, SQLite), driven through its REST API as the UI drives it, looked
at in headless Chromium, and stopped with Ctrl-C.

The launcher (scripts/airflow) runs on a port of this project's test range, with its own Airflow home
and data root in a temporary folder. Screenshots go to test-artifacts/make-airflow/.
"""

from __future__ import annotations

import html
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from headless_chromium import find_chromium, open_page

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "make-airflow"
DAG_ID = "train_on_synthdet_sample"
TINY = {
    "synthetic_dataset": "generate://synthetic?num_images=12&image_size=96&seed=0",
    "real_dataset": "generate://real-proxy?num_images=40&image_size=96&seed=1",
    "preset": "cpu-demo",
    "batch_size": 4,
    "overrides": ["max_steps=2", "model.min_size=96", "model.max_size=96"],
}
RECIPES = {"train_on_synthdet_sample", "train_on_real_world_dataset", "train_on_synthetic_and_real_dataset",
           "train_on_synthetic_dataset_unity_simulation", "evaluate_the_model", "evaluate_new_synthetic_datasets"}


@dataclass
class Airflow:
    """The running launcher, and the REST API as the UI calls it (a JWT from /auth/token)."""

    proc: subprocess.Popen
    port: int
    home: Path
    data_root: Path
    password: str
    output: list[str]
    token: str = ""

    @property
    def base(self) -> str:
        return f"http://localhost:{self.port}"

    def call(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                data = answer.read()
                return answer.status, data.decode() if raw else json.loads(data or b"null")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def login(self) -> None:
        self.token = ""
        status, answer = self.call("POST", "/auth/token", {"username": "admin", "password": self.password})
        assert status == 201, answer
        self.token = answer["access_token"]

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> tuple[int, Any]:
        """What the UI's trigger dialog does: unpause the DAG, then post the run with its conf."""
        status, answer = self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        assert status == 200, answer
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, run = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}")
            assert status == 200, run
            if run["state"] in ("success", "failed"):
                return run
            assert self.proc.poll() is None, "\n".join(self.output[-50:])
            time.sleep(3)
        raise TimeoutError(f"{dag_id} {run_id} still running after {timeout_s} s")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        status, answer = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances")
        assert status == 200, answer
        return {t["task_id"]: t["state"] for t in answer["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        status, answer = self.call(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/xcomEntries/return_value")
        assert status == 200, answer
        value = answer["value"]
        return json.loads(value) if isinstance(value, str) else value

    def cookies(self) -> list[dict[str, str]]:
        return [{"name": "_token", "value": self.token, "url": self.base}]


def quote(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` (by parent links), with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Airflow:
    work = tmp_path_factory.mktemp("make-airflow")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SYNTHVAL_"))}
    env.update(AIRFLOW_PORT=str(port), SYNTHVAL_AIRFLOW_HOME=str(work / "airflow_home"),
               SYNTHVAL_DATA_ROOT=str(work / "data"), VENV_BIN=str(Path(sys.executable).parent),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "airflow")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    password = ""
    deadline = time.monotonic() + 600
    while not password:
        assert time.monotonic() < deadline and proc.poll() is None, "\n".join(output[-80:])
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            continue
        if line.strip().startswith("UI ") and "login: admin / " in line:
            assert f"http://localhost:{port}" in line
            password = line.rsplit("login: admin / ", 1)[1].strip()
    instance = Airflow(proc, port, work / "airflow_home", work / "data", password, output)
    instance.login()
    yield instance
    if proc.poll() is None:  # the Ctrl-C test did not run or failed: stop it the same way
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tiny_run(airflow) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:  # the dag-processor has parsed the folder once the DAG exists
        status, _ = airflow.call("GET", f"/api/v2/dags/{DAG_ID}")
        if status == 200:
            break
        assert time.monotonic() < deadline, f"{DAG_ID} never appeared"
        time.sleep(2)
    status, run = airflow.trigger(DAG_ID, TINY)
    assert status == 200, run
    return airflow.wait_for_run(DAG_ID, run["dag_run_id"])


def test_every_dag_and_the_plugin_load(airflow, tiny_run):
    status, answer = airflow.call("GET", "/api/v2/dags?tags=synthval&limit=100")
    assert status == 200 and {d["dag_id"] for d in answer["dags"]} == RECIPES, answer
    status, answer = airflow.call("GET", "/api/v2/importErrors")
    assert status == 200 and answer["total_entries"] == 0, answer
    status, answer = airflow.call("GET", "/api/v2/plugins")
    assert status == 200 and {"synthval", "synthval_leaderboard"} <= {p["name"] for p in answer["plugins"]}, answer


def test_a_triggered_recipe_runs_and_pushes_its_uris(airflow, tiny_run):
    run_id = tiny_run["dag_run_id"]
    assert tiny_run["state"] == "success", airflow.task_states(DAG_ID, run_id)
    assert set(airflow.task_states(DAG_ID, run_id).values()) == {"success"}
    train = airflow.xcom(DAG_ID, run_id, "train")
    evaluate = airflow.xcom(DAG_ID, run_id, "evaluate")
    publish = airflow.xcom(DAG_ID, run_id, "publish")
    run_root = airflow.data_root / DAG_ID
    for uri in (train["checkpoint_uri"], evaluate["metrics_uri"], publish["result_uri"], publish["report_uri"]):
        assert Path(uri).is_file(), uri
    assert Path(train["checkpoint_uri"]).is_relative_to(run_root)
    metrics = json.loads(Path(evaluate["metrics_uri"]).read_text())
    assert metrics["mAP"] == pytest.approx(evaluate["summary"]["mAP"])
    record = json.loads(Path(publish["result_uri"]).read_text())
    assert run_id in json.dumps(record)


def test_the_leaderboard_page_lists_the_run(airflow, tiny_run):
    run_id = tiny_run["dag_run_id"]
    status, entries = airflow.call("GET", "/synthval-leaderboard/api/leaderboard?role=synthetic")
    assert status == 200, entries
    mine = [e for e in entries if e["run_id"] == run_id]
    assert len(mine) == 1 and mine[0]["dataset"] == TINY["synthetic_dataset"], entries
    summary = airflow.xcom(DAG_ID, run_id, "evaluate")["summary"]
    assert mine[0]["mAP"] == pytest.approx(summary["mAP"])
    status, page = airflow.call("GET", "/synthval-leaderboard/", raw=True)
    assert status == 200 and html.escape(TINY["synthetic_dataset"]) in page


def test_bad_conf_is_refused_at_trigger_and_nothing_runs(airflow, tiny_run):
    before = airflow.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"]
    for conf, field in (({"test_split": "['test','--log-level','DEBUG']"}, "test_split"),
                        ({"epochs": "many"}, "epochs"), ({"model": "resnet9000"}, "model")):
        status, answer = airflow.trigger(DAG_ID, {**TINY, **conf})
        assert status == 400 and f"Invalid input for param {field}" in answer, (status, answer)
    assert airflow.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"] == before


def test_an_unknown_conf_key_fails_the_first_tasks_before_anything_runs(airflow, tiny_run):
    status, run = airflow.trigger(DAG_ID, {**TINY, "epoch": 3})
    assert status == 200, run  # Airflow cannot refuse it at trigger: the run exists
    run = airflow.wait_for_run(DAG_ID, run["dag_run_id"], timeout_s=300)
    states = airflow.task_states(DAG_ID, run["dag_run_id"])
    assert run["state"] == "failed" and states["fetch_synthetic"] == states["fetch_real"] == "failed", states
    assert {states[t] for t in ("train", "evaluate", "publish")} == {"upstream_failed"}, states
    status, log = airflow.call(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run['dag_run_id'])}/taskInstances/fetch_real/logs/1",
        raw=True)
    assert status == 200 and "conf key 'epoch' is not a param of train_on_synthdet_sample" in log
    assert "did you mean 'epochs'" in log
    slug = run["dag_run_id"].replace(":", "-").split("+")[0]
    assert not (airflow.data_root / DAG_ID / slug).exists()  # nothing fetched, nothing written


def _click(text: str) -> str:
    """JavaScript: where to click the (last) button whose text is `text`."""
    return (f"(() => {{ const b = Array.from(document.querySelectorAll('button')).filter("
            f"b => b.innerText.trim() === {text!r}).pop(); if (!b) return null; const r = b.getBoundingClientRect();"
            f" return {{click: [r.x + r.width / 2, r.y + r.height / 2]}}; }})()")


@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (scripts/install-test-deps installs it)")
def test_the_ui_shows_the_run_the_trigger_form_and_the_report(airflow, tiny_run):
    run_id = tiny_run["dag_run_id"]
    grid = open_page(f"{airflow.base}/dags/{DAG_ID}/runs/{quote(run_id)}", ARTIFACTS / "run.png",
                     cookies=airflow.cookies(), settle_s=2,
                     steps=[("", "document.body.innerText.includes('publish')")])
    assert "publish" in grid.text and "Sign in" not in grid.text
    form = open_page(f"{airflow.base}/dags/{DAG_ID}", ARTIFACTS / "trigger-form.png", cookies=airflow.cookies(),
                     height=1600, settle_s=1, steps=[
                         ("", "document.body.innerText.includes('Trigger')"),
                         (_click("Trigger"), "document.body.innerText.includes('Advanced Options')"),
                         (_click("Training"), "document.body.innerText.includes('Config overrides as key=value')"),
                     ])
    section = form.text[form.text.index("preset"):form.text.index("Config overrides as key=value")]
    lines = [line.strip() for line in section.splitlines() if line.strip()]
    # The model's empty choice reads as the preset's, not "null"; overrides (default []) is not marked
    # required (a required field's label is followed by "*"), as preset is.
    assert "(the preset's)" in lines and "null" not in lines, lines
    assert lines[lines.index("preset") + 1] == "*", lines
    assert lines[-1] == "overrides" or lines[lines.index("overrides") + 1] != "*", lines
    board = open_page(f"{airflow.base}/synthval-leaderboard/", ARTIFACTS / "leaderboard.png",
                      cookies=airflow.cookies())
    assert TINY["synthetic_dataset"] in board.text and not board.errors, board.errors
    report = Path(airflow.xcom(DAG_ID, run_id, "publish")["report_uri"])
    page = open_page(report, ARTIFACTS / "run-report.png")
    assert not page.errors and page.broken_images == 0, page.errors


def test_ctrl_c_stops_every_process_a_running_step_included(airflow, tiny_run):
    """Last: it stops the instance. A long training is running when the user presses Ctrl-C."""
    long = {**TINY, "overrides": ["max_steps=1000000", "model.min_size=96", "model.max_size=96"]}
    status, run = airflow.trigger(DAG_ID, long)
    assert status == 200, run
    deadline = time.monotonic() + 300
    step = None
    while step is None:
        assert time.monotonic() < deadline, airflow.task_states(DAG_ID, run["dag_run_id"])
        procs = descendants(airflow.proc.pid)
        step = next((pid for pid, cmd in procs.items() if "synthval" in cmd and " train " in f" {cmd} "), None)
        time.sleep(1)
    time.sleep(5)  # into its training loop
    procs = descendants(airflow.proc.pid)
    assert len(procs) >= 5, procs  # four components, their workers, the task, the step
    os.killpg(airflow.proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    assert airflow.proc.wait(timeout=180) == 0, "\n".join(airflow.output[-40:])
    time.sleep(1)
    left = {pid: cmd for pid, cmd in procs.items() if alive(pid)}
    assert not left, left
    assert not alive(step)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", airflow.port))  # nothing listens on the UI's port any more
    assert "stopping api-server, scheduler, dag-processor, triggerer" in "\n".join(airflow.output)
