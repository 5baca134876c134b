"""Find tritonserver, prepare its Python backend and environment, start it, wait for READY.

In NVIDIA's container ``tritonserver`` is on PATH with its own backends. Elsewhere the
``nvidia-pytriton`` wheel ships a complete server: we copy its Python backend and the stub that
matches this interpreter into a backend directory, and put this environment's ``bin/`` first on
PATH so the stub imports this environment's packages (numpy, torch, transformers, bucketserve).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bucketserve.config import MODEL_PATH_ENV, PARAMS_ENV
from bucketserve.launcher.watchdog import StubWatch

STUB_DIED_EXIT = 3
"""Exit code of ``bucketserve serve`` after it stopped tritonserver because a model's stub died."""


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]


def pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def prepare_backend_dir(root: Path, dest: Path) -> Path:
    """Python backend + the stub for this interpreter's version, as tritonserver expects them."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(source, python_dir / source.name)
    return dest


def server_environment(root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if root is not None:
        libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


def build_command(model_repository: Path, backend_tmp: Path, http_port: int, grpc_port: int,
                  metrics_port: int, address: str, extra: list[str]) -> ServerCommand:
    system = shutil.which("tritonserver")
    root = None if system else pytriton_root()
    if system is None and root is None:
        raise LaunchError("tritonserver not found: not on PATH and nvidia-pytriton is not installed")
    argv = [system or str(root / "bin" / "tritonserver")]
    if root is not None:
        argv.append(f"--backend-directory={prepare_backend_dir(root, backend_tmp)}")
    argv += [
        f"--model-repository={model_repository}",
        f"--http-address={address}", f"--http-port={http_port}",
        f"--grpc-address={address}", f"--grpc-port={grpc_port}",
        f"--metrics-address={address}", f"--metrics-port={metrics_port}",
        *extra,
    ]
    return ServerCommand(argv, server_environment(root))


def is_ready(address: str, http_port: int) -> bool:
    host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def failure_reason(lines: collections.deque) -> str:
    keys = ("error", "failed", "exception", "traceback")
    picked = [line for line in lines if any(k in line.lower() for k in keys)]
    return "\n".join(picked[-15:] or list(lines)[-15:])


def watch_stubs(proc: subprocess.Popen, watch: StubWatch, stopping: threading.Event, interval: float) -> int:
    """Wait for tritonserver; if a model's stub dies first, stop it (health checks then fail) and
    return STUB_DIED_EXIT."""
    while proc.poll() is None:
        time.sleep(interval)
        dead = watch.dead()
        if dead and not stopping.is_set() and proc.poll() is None:
            names = ", ".join(f"{model} (pid {pid})" for pid, model in sorted(dead.items()))
            print(f"[bucketserve] ERROR: the Python stub process of {names} died; Triton would go on reporting "
                  f"READY and fail every request to it, so stopping tritonserver for a supervisor to restart",
                  file=sys.stderr, flush=True)
            stopping.set()
            proc.terminate()
            proc.wait()
            return STUB_DIED_EXIT
    return proc.returncode


def start_gateway(address: str, grpc_port: int, port: int, model_path: Path | None) -> subprocess.Popen:
    """The OpenAI gateway beside tritonserver, on the same address, talking to it over loopback gRPC."""
    from bucketserve_client.defaults import default_model_dir

    tokenizer = model_path.resolve() if model_path is not None else default_model_dir()
    grpc_host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    argv = [sys.executable, "-m", "bucketserve.cli", "openai-gateway", "--url", f"{grpc_host}:{grpc_port}",
            "--host", address, "--port", str(port), "--tokenizer", str(tokenizer)]
    gateway = subprocess.Popen(argv)
    host = f"[{grpc_host}]" if ":" in grpc_host else grpc_host
    while gateway.poll() is None:  # READY means every port answers
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # it answers: 503 until Triton is ready for it
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    return gateway


def serve(model_repository: Path, model_path: Path | None, http_port: int, grpc_port: int, metrics_port: int,
          address: str, ready_timeout: float, extra: list[str], stub_watch_s: float = 1.0, openai_port: int = 0,
          params: dict[str, str] | None = None) -> int:
    """Run tritonserver (and the OpenAI gateway, if ``openai_port``) until it exits or we are signalled;
    return its exit code."""
    with tempfile.TemporaryDirectory(prefix="bucketserve-backends-") as tmp:
        cmd = build_command(model_repository.resolve(), Path(tmp), http_port, grpc_port, metrics_port,
                            address, extra)
        if model_path is not None:
            cmd.env[MODEL_PATH_ENV] = str(model_path.resolve())
        if params:
            cmd.env[PARAMS_ENV] = json.dumps(params)
        print(f"[bucketserve] starting {' '.join(cmd.argv)}", flush=True)
        proc = subprocess.Popen(cmd.argv, env=cmd.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        tail: collections.deque = collections.deque(maxlen=400)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                sys.stdout.write(line)
                sys.stdout.flush()

        threading.Thread(target=pump, daemon=True).start()

        stopping = threading.Event()

        def forward(signum: int, _frame: object) -> None:
            stopping.set()  # the stubs now exit because we asked, not because they failed
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)

        deadline = time.monotonic() + ready_timeout
        while not is_ready(address, http_port):
            if proc.poll() is not None:
                time.sleep(0.2)  # let the pump catch the last lines
                print(f"[bucketserve] ERROR: tritonserver exited with code {proc.returncode} before READY:\n"
                      f"{failure_reason(tail)}", file=sys.stderr, flush=True)
                return proc.returncode or 1
            if time.monotonic() > deadline:
                print(f"[bucketserve] ERROR: not READY after {ready_timeout:.0f}s:\n{failure_reason(tail)}",
                      file=sys.stderr, flush=True)
                proc.terminate()
                proc.wait(30)
                return 1
            time.sleep(0.25)
        gateway = start_gateway(address, grpc_port, openai_port, model_path) if openai_port else None
        if gateway is not None and gateway.poll() is not None:
            print(f"[bucketserve] ERROR: the OpenAI gateway exited with code {gateway.returncode}", file=sys.stderr,
                  flush=True)
            proc.terminate()
            proc.wait(30)
            return 1
        openai = f", OpenAI http://{address}:{openai_port}/v1" if gateway else ""
        print(f"[bucketserve] READY: HTTP {address}:{http_port}, gRPC {address}:{grpc_port}, "
              f"metrics {address}:{metrics_port}{openai}", flush=True)
        try:
            if stub_watch_s > 0:
                code = watch_stubs(proc, StubWatch(proc.pid), stopping, stub_watch_s)
            else:
                code = proc.wait()
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(30)
        print(f"[bucketserve] tritonserver exited with code {code}", flush=True)
        return code
