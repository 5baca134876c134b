"""Notice when a model's Python stub process dies under a running tritonserver.

Triton 2.51 keeps answering READY for a model whose stub was killed (OOM killer, a segfault in a
native library) and fails every request to it with "Stub process ... is not healthy"; readiness
learned to see this only in later releases (server PR #8552). ``bucketserve serve`` therefore
watches the stubs itself and stops the server when one dies, so health checks fail and a
supervisor (systemd, Kubernetes) restarts it instead of routing traffic to a dead model.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

STUB = "triton_python_backend_stub"


def children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def stubs(server_pid: int) -> dict[int, str]:
    """The server's Python stub processes: pid -> model name (read from the model.py path each runs)."""
    out = {}
    for pid in children(server_pid):
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]) == STUB and len(argv) > 1:
            out[pid] = Path(argv[1]).parent.parent.name
    return out


class StubWatch:
    """Remembers the stubs seen once the server is READY and reports those that have gone."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.known = stubs(server_pid)

    def dead(self) -> dict[int, str]:
        alive = set(stubs(self.server_pid))
        return {pid: model for pid, model in self.known.items() if pid not in alive}
