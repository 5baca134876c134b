"""BucketServe: bucket-based dynamic batching for LLM serving, as a Triton Python backend and in process.

``LLM`` loads torch on first use, so importing this package (or its torch-free ``engine`` core, as the
tests and tools do) stays cheap.
"""

from __future__ import annotations

from typing import Any

from bucketserve.engine.request import FinishReason, InvalidInput, Priority, SamplingParams

__all__ = ["LLM", "Completion", "FinishReason", "InvalidInput", "Priority", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion"):
        from bucketserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'bucketserve' has no attribute {name!r}")
