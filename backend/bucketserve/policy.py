"""Admission policies: which waiting requests form the next prefill batch.

The scheduler asks its policy once per engine step; the policy sees the waiting queue and the
limits of this step and returns the requests to prefill, in batch order. The bucket policy of the
BucketServe paper plugs in here beside the plain FCFS baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from bucketserve.request import Request


@dataclass(frozen=True)
class StepLimits:
    free_slots: int
    """How many more sequences the running set can take."""
    max_prefill_tokens: int
    """Padded tokens (batch size x longest prompt) one prefill batch may hold."""


class AdmissionPolicy(Protocol):
    def select(self, waiting: Sequence[Request], limits: StepLimits) -> list[Request]: ...


def padded_tokens(batch: Sequence[Request]) -> int:
    return len(batch) * max((r.prompt_len for r in batch), default=0)


class FCFSPolicy:
    """Arrival order; stop at the first request that does not fit, so nobody is overtaken."""

    def select(self, waiting: Sequence[Request], limits: StepLimits) -> list[Request]:
        batch: list[Request] = []
        for request in waiting:
            if len(batch) >= limits.free_slots:
                break
            if batch and padded_tokens([*batch, request]) > limits.max_prefill_tokens:
                break
            batch.append(request)
        return batch


POLICIES: dict[str, type] = {"fcfs": FCFSPolicy}
