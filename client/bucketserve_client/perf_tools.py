"""Run perf_analyzer from the tritonclient wheel without root or apt.

perf_analyzer links ``libb64.so.0d`` and ``libcudart.so.12``. The nvidia-pytriton wheel ships
both under hashed names; a private directory of symlinks with the plain names, put on
LD_LIBRARY_PATH, is all it needs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

WANTED = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def library_dir() -> Path | None:
    """A directory of plain-named links to the wheel's libraries, or None without the wheel."""
    try:
        import pytriton
    except ImportError:
        return None
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    links = Path(cache) / "bucketserve" / "perf-libs"
    links.mkdir(parents=True, exist_ok=True)
    for plain, prefix in WANTED.items():
        found = sorted(libs.glob(f"{prefix}*"))
        link = links / plain
        if found and not (link.is_symlink() and link.resolve() == found[0].resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(found[0])
    return links


def perf_analyzer_command() -> tuple[str, dict[str, str]]:
    """The perf_analyzer executable beside this interpreter, and the environment it runs in."""
    exe = shutil.which("perf_analyzer", path=os.path.dirname(sys.executable)) or shutil.which("perf_analyzer")
    if exe is None:
        raise FileNotFoundError("perf_analyzer not found: install tritonclient[all]==2.51.*")
    env = dict(os.environ)
    links = library_dir()
    if links is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(links), env.get("LD_LIBRARY_PATH", "")])
    return exe, env
