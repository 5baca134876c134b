"""BucketServe: bucket-based dynamic batching for LLM serving, as a Triton Python backend and in process.

``LLM`` loads torch on first use, so importing this package (or its torch-free ``engine`` core, as the
tests and tools do) stays cheap.

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=30000`` unless the environment already
says otherwise: an OpenMP worker spins that many turns (a fraction of a millisecond) for the next parallel
region, then sleeps. Spinning for as long as GNU OpenMP's default (milliseconds) takes the cores from the
threads that stream responses, and a parallel region then waits for its descheduled thread (on 2 cores
the 156M model's in-process throughput rose 15% with no spinning); not spinning at all makes every one of
a step's few hundred regions wait for its worker to wake (offline mixed through Triton, alternating runs:
796/874 output tok/s without spinning, 917/923 with 30000 turns). Both take effect only if torch has not
been imported yet (OpenMP reads them once, when torch loads).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from bucketserve.engine.request import FinishReason, InvalidInput, Priority, SamplingParams

__all__ = ["LLM", "Completion", "FinishReason", "InvalidInput", "Priority", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion"):
        from bucketserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'bucketserve' has no attribute {name!r}")
