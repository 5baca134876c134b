"""When each request of a run is sent: all at once, Poisson, or bursty (gamma inter-arrival gaps).

A gamma process with coefficient of variation ``cv`` has the same mean rate as Poisson (cv = 1 is
Poisson) but clumps requests into bursts as cv grows, the way real traffic arrives.
"""

from __future__ import annotations

import random

ARRIVALS = ("offline", "poisson", "gamma")


def arrival_times(kind: str, n: int, rate: float = 0.0, seed: int = 0, cv: float = 2.0) -> list[float]:
    """Seconds from the run's start at which each of ``n`` requests is sent (non-decreasing, first at 0)."""
    if kind == "offline":
        return [0.0] * n
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival process {kind!r}; one of {ARRIVALS}")
    if rate <= 0:
        raise ValueError(f"{kind} arrivals need a rate > 0 requests/s, got {rate}")
    if cv <= 0:
        raise ValueError(f"gamma arrivals need cv > 0, got {cv}")
    rng = random.Random(seed)
    shape = 1.0 if kind == "poisson" else 1.0 / cv**2
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
    return times
