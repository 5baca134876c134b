"""What a run measured: per-request outcomes folded into rates, percentiles, SLO attainment and capacity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CAPACITY_ATTAINMENT = 0.8
"""The paper's capacity criterion: the highest request rate served with at least this SLO attainment."""
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it; times in seconds from the run's start."""

    cls: str
    sent: float
    ttft: float | None  # sent -> first token
    e2e: float | None  # sent -> final response
    output_tokens: int
    ttft_slo: float  # seconds
    e2e_slo: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def met_slo(self) -> bool:
        return self.ok and self.ttft is not None and self.ttft <= self.ttft_slo and self.e2e <= self.e2e_slo


def percentile(values: list[float], q: float) -> float:
    """numpy's (linear interpolation between closest ranks); NaN for no values."""
    return float(np.percentile(values, q)) if values else math.nan


def attainment(outcomes: list[Outcome]) -> float:
    return sum(o.met_slo for o in outcomes) / len(outcomes) if outcomes else math.nan


@dataclass(frozen=True)
class Summary:
    requests: int
    completed: int
    failed: int
    seconds: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    """Processed rate: completed requests over the time from the first send to the last final response."""
    offered_rps: float | None
    slo_attainment: float
    slo_attainment_by_class: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    """{"ttft" | "tpot" | "e2e": {"p50" | "p90" | "p99": milliseconds}}"""


def summarize(outcomes: list[Outcome], offered_rps: float | None) -> Summary:
    done = [o for o in outcomes if o.ok]
    end = max((o.sent + o.e2e for o in done), default=0.0)
    start = min((o.sent for o in outcomes), default=0.0)
    seconds = max(end - start, 1e-9)
    tokens = sum(o.output_tokens for o in done)
    series = {"ttft": [o.ttft for o in done if o.ttft is not None],
              "tpot": [o.tpot for o in done if o.tpot is not None],
              "e2e": [o.e2e for o in done]}
    latency = {name: {f"p{q}": percentile(xs, q) * 1000 for q in QUANTILES} for name, xs in series.items()}
    classes = sorted({o.cls for o in outcomes})
    by_class = {c: attainment([o for o in outcomes if o.cls == c]) for c in classes}
    return Summary(len(outcomes), len(done), len(outcomes) - len(done), seconds, tokens, tokens / seconds,
                   len(done) / seconds, offered_rps, attainment(outcomes), by_class, latency)


@dataclass(frozen=True)
class Capacity:
    rps: float | None
    """Interpolated rate where attainment falls through the threshold; None if below the lowest rate tried."""
    censored: bool
    """True when even the highest rate tried met the threshold: capacity is at least ``rps``."""


def capacity(points: list[tuple[float, float]], threshold: float = CAPACITY_ATTAINMENT) -> Capacity:
    """The highest offered rate with attainment >= threshold, interpolated linearly to the crossing
    with the next rate tried. ``points`` are (offered rate, attainment) pairs."""
    pts = sorted(points)
    above = [i for i, (_, a) in enumerate(pts) if a >= threshold]
    if not above:
        return Capacity(None, False)
    i = above[-1]
    if i == len(pts) - 1:
        return Capacity(pts[i][0], True)
    (r0, a0), (r1, a1) = pts[i], pts[i + 1]
    return Capacity(r0 + (r1 - r0) * (a0 - threshold) / (a0 - a1), False)
