"""Arrival processes: offline at once, Poisson and gamma at the asked mean rate, the right burstiness."""

from __future__ import annotations

import statistics

import pytest

from bucketserve_client.arrivals import arrival_times

N = 20_000


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_offline_sends_everything_at_zero():
    assert arrival_times("offline", 5) == [0.0] * 5


@pytest.mark.parametrize("kind,cv", [("poisson", 1.0), ("gamma", 2.0), ("gamma", 0.5)])
def test_mean_rate_and_coefficient_of_variation(kind, cv):
    times = arrival_times(kind, N, rate=5.0, seed=1, cv=cv)
    assert times[0] == 0 and all(b >= a for a, b in zip(times, times[1:]))
    g = gaps(times)
    mean = statistics.mean(g)
    assert abs(mean - 0.2) < 0.2 * 0.04  # 4%: several standard errors of the mean at cv <= 2
    assert abs(statistics.stdev(g) / mean - cv) < 0.1 * cv


def test_bursty_arrivals_clump():
    """At the same mean rate, gamma (cv 3) packs more requests into its busiest second than Poisson."""
    def busiest(times: list[float]) -> int:
        per_second: dict[int, int] = {}
        for t in times:
            per_second[int(t)] = per_second.get(int(t), 0) + 1
        return max(per_second.values())

    assert busiest(arrival_times("gamma", 2000, 4.0, seed=2, cv=3.0)) > 2 * busiest(arrival_times("poisson", 2000, 4.0, seed=2))


def test_seeds_reproduce():
    assert arrival_times("gamma", 100, 3.0, seed=9) == arrival_times("gamma", 100, 3.0, seed=9)
    assert arrival_times("gamma", 100, 3.0, seed=9) != arrival_times("gamma", 100, 3.0, seed=10)


@pytest.mark.parametrize("kind,rate,cv,message", [
    ("poisson", 0.0, 1.0, "need a rate > 0"), ("gamma", 1.0, 0.0, "cv > 0"), ("uniform", 1.0, 1.0, "unknown arrival")])
def test_bad_parameters_are_refused(kind, rate, cv, message):
    with pytest.raises(ValueError, match=message):
        arrival_times(kind, 3, rate, cv=cv)
