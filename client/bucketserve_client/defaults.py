"""What the client and the server agree on without talking: where the default model lives and the text
its tokenizer was trained on (so benchmark prompts are real text under that tokenizer).

The server package builds the default model from this corpus; the client only reads it. Imports go
one way, from ``bucketserve`` to ``bucketserve_client``, never back.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator


def default_model_dir() -> Path:
    """Where ``bucketserve serve`` keeps the default model unless told otherwise."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bucketserve" / "models" / "tiny-llama"


def corpus_files() -> list[Path]:
    """Python's own standard library: text every machine with this interpreter has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts]
    return sorted(files)


def corpus(limit_bytes: int) -> Iterator[str]:
    """Yield stdlib sources in a fixed order until ``limit_bytes``, so the tokenizer is reproducible."""
    used = 0
    for path in corpus_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        yield text
        used += len(text)
        if used >= limit_bytes:
            return


def corpus_text(limit_bytes: int = 1_500_000) -> str:
    return "\n".join(corpus(limit_bytes))
