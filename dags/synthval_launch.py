"""The process a step starts, on every backend: ``synthval <step> ...``, or torchrun around it.

Also the names of the environment variables through which a backend hands a step what is not on its
command line (the XCom file, secrets); `synthval.cli` reads them. One place, so that the local
process, the pod and the Job's pods cannot drift apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

XCOM_FILE_ENV = "SYNTHVAL_XCOM_FILE"  # read by synthval.cli
USIM_TOKEN_ENV = "USIM_ACCESS_TOKEN"  # read by synthval.cli
USIM_TOKEN_FILE_ENV = "USIM_ACCESS_TOKEN_FILE"  # read by synthval.cli
RESULTS_DB_ENV = "SYNTHVAL_RESULTS_DB_URL"  # read by synthval.cli
USIM_API_ENV = "SYNTHVAL_USIM_API"  # read by synthval.cli


def synthval_executable() -> str:
    """The `synthval` console script installed next to this Python, else `python -m synthval.cli`."""
    candidate = Path(sys.executable).with_name("synthval")
    return str(candidate) if candidate.exists() else ""


@dataclass(frozen=True)
class Rendezvous:
    """Where the torchrun agents of a multi-node step meet (c10d): ``host:port`` of node 0, a run id of
    the group, how long an agent waits for the others (and for node 0's store: pods of one Job can start
    minutes apart on a node pool that scales up), how often the group restarts as a whole."""

    endpoint: str
    run_id: str
    join_timeout_s: int = 600
    max_restarts: int = 2


def launch_command(argv: list[str], gpus: int, *, local: bool, nodes: int = 1,
                   rendezvous: Rendezvous | None = None) -> list[str]:
    """Return the process to start for ``argv`` (``["synthval", step, ...]``).

    More than one GPU launches one process per GPU through torchrun, which runs ``python -m
    synthval.cli`` in each. Locally the console script next to the worker's Python is used. With
    ``nodes`` > 1 this is one node's agent of ``nodes`` that meet at ``rendezvous`` (dags/synthval_jobs.py).
    """
    if argv[:1] != ["synthval"]:
        raise ValueError(f"a synthval step starts with 'synthval', got {argv[:2]!r}")
    torchrun = [sys.executable, "-m", "torch.distributed.run"] if local else ["torchrun"]
    if nodes > 1:
        if rendezvous is None:
            raise ValueError(f"{nodes} nodes need a rendezvous endpoint")
        return [*torchrun, "--nnodes", str(nodes), "--nproc-per-node", str(max(gpus, 1)),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous.endpoint, "--rdzv-id", rendezvous.run_id,
                "--rdzv-conf", f"join_timeout={rendezvous.join_timeout_s},read_timeout={rendezvous.join_timeout_s}",
                "--max-restarts", str(rendezvous.max_restarts), "-m", "synthval.cli", *argv[1:]]
    if gpus > 1:
        return [*torchrun, "--standalone", "--nproc-per-node", str(gpus), "-m", "synthval.cli", *argv[1:]]
    if local:
        exe = synthval_executable()
        return [exe, *argv[1:]] if exe else [sys.executable, "-m", "synthval.cli", *argv[1:]]
    return argv
