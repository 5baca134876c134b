"""The CPU kernels (``csrc/``), built with the machine's compiler on first use.

torch has no CPU op for attention over paged KV (its flex attention needs Inductor's compile, varlen
attention is CUDA-only), and the elementwise steps of a layer (RMSNorm with the residual add, silu x up,
rotary embedding) take several passes each as torch ops. So we build one small C++ module through
``torch.utils.cpp_extension``: about 15 s the first time on a machine, cached in
``~/.cache/torch_extensions`` after that (under a name that changes with the sources). Where it cannot
be built (no compiler, no ninja) the executor falls back to torch ops and says so.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("module.cpp", "paged_attention.cpp", "prefill_attention.cpp", "elementwise.cpp", "kv_write.cpp")
_lock = threading.Lock()
_built: dict[str, Any] = {}


def cpu_kernels(log: Callable[[str], None]) -> Any | None:
    """The compiled module, or None (logged) when it cannot be built here."""
    with _lock:
        if "module" not in _built:
            _built["module"] = _build(log)
        return _built["module"]


def _build(log: Callable[[str], None]) -> Any | None:
    # the build runs ninja, which pip installs beside this interpreter (the project depends on it)
    here = os.path.dirname(sys.executable)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
    # torch rebuilds when a source changes, not a header: the name carries a digest of every file
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")))
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"bucketserve_kernels_{digest.hexdigest()[:12]}", sources=[str(CSRC / s) for s in SOURCES],
                    extra_include_paths=[str(CSRC)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - any failure to build means: use torch ops
        log(f"could not build the CPU kernels ({type(e).__name__}: {str(e)[:300]}); attention and the elementwise "
            "steps run on torch ops")
        return None
