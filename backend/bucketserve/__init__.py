"""BucketServe: bucket-based dynamic batching for LLM serving, as a Triton Python backend and in process.

``LLM`` loads torch on first use, so importing this package (or its torch-free ``engine`` core, as the
tests and tools do) stays cheap.

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already says otherwise: OpenMP
threads that spin between parallel regions (GNU OpenMP's default) take the cores from the threads that
stream responses, and a parallel region then waits for its descheduled thread; on 2 cores the 156M
model's in-process throughput rose 15% (the default model's 0-2%). It takes effect only if torch has
not been imported yet (OpenMP reads it once, when torch loads).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bucketserve.engine.request import FinishReason, InvalidInput, Priority, SamplingParams

__all__ = ["LLM", "Completion", "FinishReason", "InvalidInput", "Priority", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion"):
        from bucketserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'bucketserve' has no attribute {name!r}")
