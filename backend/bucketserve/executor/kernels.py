"""The CPU decode-attention kernel (``csrc/paged_attention.cpp``), built with the machine's compiler on first use.

torch has no CPU op for attention over paged KV (its flex attention needs Inductor's compile, varlen
attention is CUDA-only), so we build one small C++ kernel through ``torch.utils.cpp_extension``: about
20 s the first time on a machine, cached in ``~/.cache/torch_extensions`` after that. Where it cannot
be built (no compiler, no ninja) the executor falls back to torch ops and says so.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_lock = threading.Lock()
_built: dict[str, Any] = {}


def paged_attention_kernel(log: Callable[[str], None]) -> Any | None:
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
    try:
        from torch.utils.cpp_extension import load

        return load(name="bucketserve_paged_attention", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - any failure to build means: use torch ops
        log(f"could not build the CPU decode-attention kernel ({type(e).__name__}: {str(e)[:300]}); "
            "decode attention runs on torch ops")
        return None
