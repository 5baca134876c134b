"""When a stream's pending text goes out: the response thread's pacing, kept free of Triton so it can be tested alone."""

from __future__ import annotations

COST_WEIGHT = 0.05
"""Of the latest response in the moving average of a response's cost."""


class StreamPacer:
    """Spaces each stream's intermediate responses at least ``floor_s`` apart, and further apart when many streams
    run, so that building and sending them takes at most ``share`` of the time.

    A response costs the model's process ~0.3 ms of Python under the GIL and Triton's process about as much again
    (measured as the time from building it to Triton having taken it): with 64 streams answered every 50 ms that was
    a tenth of the CPU on two cores. A stream's first text and its end are not paced: the caller sends those at once.
    """

    def __init__(self, floor_s: float, share: float):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.floor_s = floor_s
        self.share = share
        self.streams = 0
        self.cost_s = 0.0

    @property
    def interval_s(self) -> float:
        return max(self.floor_s, self.streams * self.cost_s / self.share)

    def opened(self) -> None:
        self.streams += 1

    def closed(self) -> None:
        self.streams -= 1

    def sent(self, seconds: float) -> None:
        """One response took ``seconds`` from building it to Triton having taken it."""
        self.cost_s += COST_WEIGHT * (seconds - self.cost_s)

    def due(self, last_sent: float | None, now: float) -> bool:
        return last_sent is None or now - last_sent >= self.interval_s
