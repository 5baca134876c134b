"""What a reader needs to trust or repeat a measurement: when, which commit, on what machine, with what."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": _version("torch"), "transformers": _version("transformers")}


def markdown(env: dict[str, Any]) -> str:
    """One line for the top of a report."""
    parts = [f"{k}: {v}" for k, v in env.items() if v is not None and not isinstance(v, dict)]
    nested = [f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in env.items() if isinstance(v, dict)]
    return "Measured " + "; ".join(parts + nested) + "."
