"""Percentiles, run summaries and capacity on synthetic outcomes with known answers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bucketserve_client.stats import Outcome, capacity, percentile, summarize


def test_percentile_known_values_and_numpy_agreement():
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.5 and percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 99) == pytest.approx(99.01) and percentile(xs, 100) == 100 and percentile(xs, 0) == 1
    assert percentile([3.0], 99) == 3.0 and math.isnan(percentile([], 50))
    rng = random.Random(0)
    for _ in range(20):
        sample = [rng.expovariate(1) for _ in range(rng.randint(1, 50))]
        for q in (50, 90, 99):
            assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))


def outcome(cls: str, sent: float, ttft: float | None, e2e: float | None, tokens: int, ttft_slo: float = 1.0,
            e2e_slo: float = 10.0, error: str | None = None) -> Outcome:
    return Outcome(cls, sent, ttft, e2e, tokens, ttft_slo, e2e_slo, error)


def test_summary_rates_latencies_and_slo_attainment():
    outcomes = [
        outcome("online", 0.0, 0.5, 2.0, 16),  # met
        outcome("online", 1.0, 1.5, 3.0, 16),  # TTFT too late
        outcome("offline", 2.0, 0.2, 12.0, 31),  # e2e too late
        outcome("offline", 3.0, 0.1, 1.0, 11),  # met; last to finish is the one sent at 2.0 (at 14.0)
        outcome("offline", 4.0, None, None, 0, error="boom"),  # failed: counts against attainment
    ]
    s = summarize(outcomes, offered_rps=0.5)
    assert (s.requests, s.completed, s.failed) == (5, 4, 1)
    assert s.seconds == pytest.approx(14.0) and s.output_tokens == 74
    assert s.output_tokens_per_s == pytest.approx(74 / 14) and s.requests_per_s == pytest.approx(4 / 14)
    assert s.slo_attainment == pytest.approx(2 / 5)
    assert s.slo_attainment_by_class == pytest.approx({"online": 0.5, "offline": 1 / 3})
    assert s.latency_ms["ttft"]["p50"] == pytest.approx(350.0)  # median of 0.1, 0.2, 0.5, 1.5 s
    assert s.latency_ms["e2e"]["p99"] == pytest.approx(1000 * float(np.percentile([2, 3, 12, 1], 99)))
    # TPOT: time after the first token over the tokens after it
    assert s.latency_ms["tpot"]["p50"] == pytest.approx(1000 * float(np.median([1.5 / 15, 1.5 / 15, 11.8 / 30, 0.9 / 10])))


@pytest.mark.parametrize("points,rps,censored", [
    ([(1, 1.0), (2, 0.9), (3, 0.7), (4, 0.2)], 2.5, False),  # crossing half-way between 2 and 3
    ([(4, 0.2), (1, 1.0), (3, 0.7), (2, 0.9)], 2.5, False),  # order does not matter
    ([(1, 1.0), (2, 0.8), (3, 0.4)], 2.0, False),  # exactly at the threshold counts
    ([(1, 0.9), (2, 0.5), (3, 0.85), (4, 0.1)], 3 + 0.05 / 0.75, False),  # the highest good rate wins
    ([(1, 1.0), (2, 0.95)], 2.0, True),  # never fell: at least the highest rate tried
    ([(1, 0.5), (2, 0.1)], None, False),  # below the lowest rate tried
])
def test_capacity_interpolates_the_80_percent_crossing(points, rps, censored):
    c = capacity(points)
    assert c.censored is censored
    assert c.rps == (pytest.approx(rps) if rps is not None else None)
