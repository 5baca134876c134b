"""What every executor shares: end-of-sequence ids, the test-only fault hook, and the retry in halves
that keeps a failing forward (out of memory, or any error) from failing more rows than its own."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from bucketserve.engine.executor import StepOutput
from bucketserve.engine.request import Request
from bucketserve.executor.faults import FaultPlan


def eos_ids_of(generation_eos: int | list[int] | None, tokenizer: Any) -> frozenset[int]:
    """The checkpoint's generation config names the end-of-sequence tokens; else the tokenizer's."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


class ExecutorBase:
    def __init__(self, device: torch.device):
        self.device = device
        self.last_decode_positions = (0, 0)
        """(cached positions, padding positions) the last decode step attended to."""
        self.oom_retries = 0
        """Forward passes that ran out of memory and were retried as two halves."""
        self.fault_hook: Callable[[str, Sequence[Request]], None] | None = None
        """Test-only (see faults.py): called before each forward with its stage and rows."""

    def install_faults(self, spec: str) -> None:
        """Test-only: fail the forward passes ``spec`` names (see faults.py)."""
        self.fault_hook = FaultPlan.parse(spec, oom_error=torch.OutOfMemoryError)

    def _inject(self, stage: str, rows: Sequence[Request]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, rows)

    def _before_retry(self, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            self.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _in_halves(self, stage: str, rows: list[Request], forward: Callable[[list[Request]], list[int | None]],
                   undo: Callable[[list[Request]], None], out: StepOutput) -> None:
        """Run ``forward`` on ``rows``; if it fails, ``undo`` what it did and retry each half, down to
        single rows, which fail alone into ``out``."""
        try:
            self._inject(stage, rows)
            tokens = forward(rows)
        except Exception as e:
            undo(rows)
            if len(rows) == 1:
                out.fail(rows, e)
                return
            self._before_retry(e)
            half = len(rows) // 2
            self._in_halves(stage, rows[:half], forward, undo, out)
            self._in_halves(stage, rows[half:], forward, undo, out)
            return
        out.add(rows, tokens)
