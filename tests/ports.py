"""A free local TCP port, for the tests that start a server (Airflow, PostgreSQL, torchrun's rendezvous)
or need one nobody listens on: the OS picks it, so parallel runs and other sessions never collide."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (closed again: nothing listens there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
