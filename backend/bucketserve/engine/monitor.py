"""Global Monitor: what the engine did, step by step and request by request.

The engine thread records; any other thread reads a consistent ``snapshot()`` and ``drain()``s the
latency observations made since its last call (for Prometheus histograms). Plain Python, so the
offline benchmark and tests read the same numbers the metrics port shows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from bucketserve.engine.request import FinishReason, Request

ARRIVAL_WINDOW_S = 10.0
"""Arrival rate is averaged over this many seconds."""


@dataclass(frozen=True)
class BucketView:
    low: int
    up: int
    requests: int
    n_max: int


@dataclass(frozen=True)
class Snapshot:
    waiting: tuple[int, int] = (0, 0)
    """Queue depth per priority class (online, offline)."""
    running: int = 0
    buckets: tuple[BucketView, ...] = ()
    n_max: int = 0
    """N_max of the whole length range: the batch a request of any length may join."""
    kv_bytes: int = 0
    """Bytes of KV tensors the running set holds after the last step, padding and spare room included."""
    kv_peak_bytes: int = 0
    kv_reserved_bytes: int = 0
    """The running set's reservation (what admission checked against the budget)."""
    kv_budget_bytes: int = 0
    last_batch_size: int = 0
    prefill_padding: float = 0.0
    """Padding share of the last prefill batch: sum(max_len - len_i) / (batch x max_len) when padded; when
    packed, the zero rows that round its token count to a size the matmuls have seen."""
    prefill_packed: bool = False
    """Whether prefill runs packed (paged executor) rather than padded (hf executor)."""
    decode_padding: float = 0.0
    """Padding share of the running set's KV at the last decode step."""
    prefill_tokens: int = 0
    prefill_padded_tokens: int = 0
    decode_positions: int = 0
    decode_padded_positions: int = 0
    steps: int = 0
    prefill_batches: int = 0
    step_seconds: float = 0.0
    bucketing_seconds: float = 0.0
    arrival_rate: float = 0.0
    output_tokens: int = 0
    slo_met: int = 0
    slo_missed: int = 0
    expired: int = 0
    """Requests ended because their deadline could no longer be met."""
    failed: int = 0
    """Requests ended by an error in the engine or the model."""
    oom_retries: int = 0
    """Forward passes that ran out of memory and were retried in halves."""

    @property
    def prefill_padding_total(self) -> float:
        """Padding share over every prefill batch so far."""
        return self.prefill_padded_tokens / self.prefill_tokens if self.prefill_tokens else 0.0

    @property
    def decode_padding_total(self) -> float:
        """Padding share over the KV every decode step so far attended to."""
        return self.decode_padded_positions / self.decode_positions if self.decode_positions else 0.0

    @property
    def bucketing_share(self) -> float:
        return self.bucketing_seconds / self.step_seconds if self.step_seconds else 0.0


@dataclass(frozen=True)
class Observation:
    metric: str  # "ttft", "tpot", "e2e" (seconds) or "batch_size"
    value: float


class Monitor:
    def __init__(self, kv_budget_bytes: int = 0, max_pending: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        """The engine's clock (a simulator's runs in simulated time)."""
        self._lock = threading.Lock()
        self._snap = SimpleNamespace(**vars(Snapshot(kv_budget_bytes=kv_budget_bytes)))
        """The figures, changed in place: copying a frozen Snapshot on every update cost more than the
        rest of a simulated step; readers get a frozen copy."""
        self._arrival_times: deque[float] = deque()
        self._pending: deque[Observation] = deque(maxlen=max_pending)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(**vars(self._snap))

    def drain(self) -> list[Observation]:
        with self._lock:
            out = list(self._pending)
            self._pending.clear()
            return out

    def _update(self, **changes: object) -> None:
        vars(self._snap).update(changes)

    def on_arrival(self) -> None:
        now = self.clock()
        with self._lock:
            self._arrival_times.append(now)
            while self._arrival_times and self._arrival_times[0] < now - ARRIVAL_WINDOW_S:
                self._arrival_times.popleft()
            self._update(arrival_rate=len(self._arrival_times) / ARRIVAL_WINDOW_S)

    def on_prefill(self, lengths: list[int], padded: int, packed: bool) -> None:
        """A prefill batch of prompts with these lengths, computed as ``padded`` positions: packed back to back
        (rounded up to a size the matmuls have seen), or left-padded to the longest."""
        with self._lock:
            s = self._snap
            self._update(last_batch_size=len(lengths), prefill_padding=1 - sum(lengths) / padded, prefill_packed=packed,
                         prefill_tokens=s.prefill_tokens + padded,
                         prefill_padded_tokens=s.prefill_padded_tokens + padded - sum(lengths),
                         prefill_batches=s.prefill_batches + 1)
            self._pending.append(Observation("batch_size", len(lengths)))

    def on_decode(self, positions: int, padded: int) -> None:
        """A decode step attended to ``positions`` cached positions, ``padded`` of them padding."""
        with self._lock:
            s = self._snap
            self._update(decode_padding=padded / positions if positions else 0.0,
                         decode_positions=s.decode_positions + positions,
                         decode_padded_positions=s.decode_padded_positions + padded)

    def on_kv(self, kv_bytes: int) -> None:
        """Bytes the KV tensors hold now; called whenever the cache has changed size."""
        with self._lock:
            self._update(kv_peak_bytes=max(self._snap.kv_peak_bytes, kv_bytes))

    def on_step(self, step_s: float, bucketing_s: float, waiting: tuple[int, int], running: int, kv_bytes: int,
                kv_reserved: int, buckets: tuple[BucketView, ...], n_max: int) -> None:
        with self._lock:
            s = self._snap
            self._update(steps=s.steps + 1, step_seconds=s.step_seconds + step_s,
                         bucketing_seconds=s.bucketing_seconds + bucketing_s, waiting=waiting, running=running,
                         kv_bytes=kv_bytes, kv_peak_bytes=max(s.kv_peak_bytes, kv_bytes),
                         kv_reserved_bytes=kv_reserved, buckets=buckets, n_max=n_max)

    def on_finish(self, request: Request) -> None:
        reason = (request.finish_reason or FinishReason.ERROR).value
        end = request.finish_time or self.clock()
        with self._lock:
            s = self._snap
            met, missed = s.slo_met, s.slo_missed
            if request.first_token_time is not None:
                ttft = request.first_token_time - request.arrival_time
                self._pending.append(Observation("ttft", ttft))
                self._pending.append(Observation("e2e", end - request.arrival_time))
                if request.num_output > 1:
                    self._pending.append(Observation("tpot", (end - request.first_token_time) / (request.num_output - 1)))
                if request.slo_ms is not None:
                    met, missed = (met + 1, missed) if ttft * 1000 <= request.slo_ms else (met, missed + 1)
            elif request.slo_ms is not None and reason != FinishReason.CANCELLED.value:
                missed += 1
            self._update(output_tokens=s.output_tokens + request.num_output, slo_met=met, slo_missed=missed,
                         expired=s.expired + (reason == FinishReason.DEADLINE.value),
                         failed=s.failed + (reason == FinishReason.ERROR.value))

    def on_oom_retries(self, total: int) -> None:
        with self._lock:
            if total != self._snap.oom_retries:
                self._update(oom_retries=total)
