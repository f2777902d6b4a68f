"""CLI plumbing: exit codes, usage errors, and the XCom result file."""

import json
import subprocess
import sys

from synthval import __version__
from synthval.cli import get_parser, main


def test_every_subcommand_has_help(capsys):
    for command in ("fetch", "generate", "train", "finetune", "evaluate", "publish", "version"):
        assert main([command, "--help"]) == 0
        assert "usage: synthval " + command in capsys.readouterr().out


def test_usage_error_exits_2_with_one_line(capsys):
    assert main(["train", "--train-data", "x"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-dir" in err and err.startswith("error:")


def test_unknown_config_key_exits_2(tmp_path, capsys):
    code = main(["train", "--train-data", str(tmp_path), "--checkpoint-dir", str(tmp_path / "c"),
                 "--tb-log-dir", str(tmp_path / "tb"), "--set", "optimizer.momentun=0.8",
                 "--xcom-file", str(tmp_path / "x.json")])
    assert code == 2
    assert "optimizer.momentun" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "c").exists()


def test_xcom_file_from_flag_and_env(tmp_path, monkeypatch):
    flag_file = tmp_path / "flag" / "return.json"
    assert main(["version", "--xcom-file", str(flag_file)]) == 0
    assert json.loads(flag_file.read_text()) == {"version": __version__}
    env_file = tmp_path / "env.json"
    monkeypatch.setenv("SYNTHVAL_XCOM_FILE", str(env_file))
    assert main(["version"]) == 0
    assert json.loads(env_file.read_text()) == {"version": __version__}


def test_module_entry_point_runs_for_torchrun(tmp_path):
    # torchrun launches `python -m synthval.cli`; that path must behave like the console script.
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "synthval.cli", "version", "--xcom-file", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["version"] == __version__


def test_parser_is_reusable():
    args = get_parser().parse_args(["evaluate", "--predictions", "p.json", "--data", "d", "--out", "o"])
    assert args.checkpoint is None and args.predictions == "p.json"


def test_sigterm_ends_a_step_promptly_with_143(tmp_path):
    # A deleted pod gets SIGTERM; as PID 1 Python would ignore it without a handler.
    code = ("import os, signal, threading, synthval.cli as c\n"
            "c.run_command = lambda args: os.kill(os.getpid(), signal.SIGTERM) or {}\n"
            "raise SystemExit(c.main(['version']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 143, proc.stderr
    assert "interrupted (signal 15)" in proc.stderr


def test_only_rank_zero_writes_the_xcom_file(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setenv("RANK", "1")
    assert main(["version", "--xcom-file", str(out)]) == 0
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")
    assert main(["version", "--xcom-file", str(out)]) == 0
    assert out.exists()
