"""Waiting for a condition, never for a fixed time: what every test that waits on a thread or a server uses."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> None:
    """Poll until ``condition()`` holds; fail with ``what`` (or the condition's own name) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout:g} s: {what or condition}"
        time.sleep(interval)
