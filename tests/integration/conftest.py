"""A real tritonserver, started through `bucketserve serve` on free ports, shared by these tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from bucketserve_client.scrape import series
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def post_json(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST a JSON body; (status, body text), also for error statuses."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class Server:
    http: int
    grpc: int
    metrics: int
    proc: subprocess.Popen
    log: Path
    openai: int = 0
    """The OpenAI gateway's port (``serve --openai-port``), 0 when not started."""

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def post(self, path: str, body: dict) -> tuple[int, str]:
        return post_json(f"http://127.0.0.1:{self.http}{path}", body)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, model: str = "bucketserve", **labels: str) -> float:
        """The value of one ``bucketserve_`` series on the metrics port: ``name`` for ``model`` with these labels."""
        for have, value in series(self.metrics_text(), model).get(name, []):
            if all(have.get(k) == v for k, v in labels.items()):
                return value
        raise KeyError(f"{name} {model} {labels}")

    def settled(self, names: tuple[str, ...], quiet_s: float = 2.0) -> dict[str, float]:
        """These series (0 while absent) once nothing runs and they have held still for ``quiet_s``: several
        metrics refreshes (``metrics_interval_ms``, 500), so what already happened is counted in them."""
        def values() -> dict[str, float]:
            found = series(self.metrics_text(), "bucketserve")
            return {name: found[name][0][1] if found.get(name) else 0.0 for name in (*names, "bucketserve_requests_running")}

        state: dict = {"values": None, "since": 0.0}

        def still() -> bool:
            now, seen = time.monotonic(), values()
            if seen != state["values"] or seen["bucketserve_requests_running"]:
                state.update(values=seen, since=now)
                return False
            return now - state["since"] >= quiet_s

        wait_for(still, timeout=60, interval=0.2, what=f"{names} hold still")
        return {name: state["values"][name] for name in names}


def start_server(model_path: Path, log: Path, timeout: float = 300, repository: Path | None = None,
                 env: dict[str, str] | None = None, openai: bool = False, args: tuple[str, ...] = ()) -> Server:
    http, grpc, metrics, openai_port = free_ports(4)
    cmd = [sys.executable, "-m", "bucketserve.cli", "serve", "--model-path", str(model_path),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *args]
    if openai:
        cmd += ["--openai-port", str(openai_port)]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=None if env is None else {**os.environ, **env})
    server = Server(http, grpc, metrics, proc, log, openai_port if openai else 0)
    deadline = time.monotonic() + timeout
    while "[bucketserve] READY" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become READY:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return server


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(90)


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_server(model_dir, tmp_path_factory.mktemp("server") / "server.log", openai=True)
    yield s
    # a request or stream left behind keeps the model from unloading: Triton then exits 1 after its timeout
    assert stop_server(s) == 0, f"server did not stop cleanly:\n{s.log.read_text()[-3000:]}"
