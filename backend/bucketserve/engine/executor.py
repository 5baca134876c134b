"""What the engine needs from an executor (the part that runs a model on a device), as a Protocol.

The engine core stays free of torch: it hands the executor a prefill batch or asks for a decode
step, and gets back one token per row that ran plus the rows whose forward failed. Any executor
(today the transformers one in ``bucketserve.executor.hf``) is interchangeable behind this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from bucketserve.engine.memory import KVCostModel
from bucketserve.engine.request import Request


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log probability under the model (before penalties, temperature and filters, as
    vLLM reports them), its rank among all tokens (1: the most likely), and the most likely alternatives."""

    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log probability), most likely first: ``sampling.logprobs`` of them."""


@dataclass
class StepOutput:
    """What one prefill or decode step produced: a token per row that ran, and the rows whose forward
    failed even alone, with why (their KV is already dropped; every other row is unaffected)."""

    rows: list[Request] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    """By request id, for the rows whose sampling asks for log probabilities."""

    def add(self, rows: Sequence[Request], tokens: Sequence[int | None]) -> None:
        """Rows and their tokens; a row whose token is None (a prompt chunk that is not its last) got none."""
        for row, token in zip(rows, tokens):
            if token is not None:
                self.rows.append(row)
                self.tokens.append(token)

    def fail(self, rows: Sequence[Request], error: BaseException) -> None:
        self.failed += [(r, f"{type(error).__name__}: {error}") for r in rows]


class Executor(Protocol):
    page_size: int
    """Positions per KV page (its prefill is then packed); 0: padded caches and padded prefill."""
    num_parameters: int
    max_position_embeddings: int
    eos_ids: frozenset[int]
    last_decode_positions: tuple[int, int]
    """(cached positions, padding positions) the last decode step attended to."""
    oom_retries: int
    """Forward passes that ran out of memory and were retried as two halves."""
    unified_step: bool
    """The executor runs a step's prefill and decode as one forward (``step``), and prefills long prompts in chunks
    (each request's positions ``prefilled`` to ``prefill_end``). False: ``prefill`` then ``decode``, whole prompts."""

    def info(self) -> dict[str, str]:
        """What runs, for logs, metrics and reports: executor, dtype, device, matmuls."""

    def kv_cost(self) -> KVCostModel:
        """What one cached position costs."""

    def free_device_memory(self, max_prefill_tokens: int, max_len: int) -> int | None:
        """Accelerator bytes free for the KV cache after the weights and a worst-case prefill; None on the CPU."""

    def allocate(self, budget_bytes: int) -> None:
        """Get the KV cache ready for a budget of ``budget_bytes`` (M_safe); forgets any running set."""

    def install_faults(self, spec: str) -> None:
        """Test-only: fail the forward passes ``spec`` names."""

    def prefill_positions(self, lengths: list[int], decode_rows: int = 0) -> int:
        """Positions a prefill of prompts of these lengths computes, padding included; ``decode_rows``: running
        rows in the same forward (a unified step), not counted, though they share the padding's rounding."""

    def prefill(self, batch: Sequence[Request]) -> StepOutput:
        """Run the batch's prompts, sample each first token, and add the rows to the running set."""

    def decode(self) -> StepOutput:
        """One token for every running row."""

    def step(self, batch: Sequence[Request]) -> StepOutput:
        """``unified_step`` executors: the batch's prompt chunks and one token for every row running before it, as
        one forward; a request whose prompt this chunk completes gets its first token and joins the running rows."""

    def drop(self, ids: set[int]) -> None:
        """Finished or aborted sequences leave the running set; their KV is freed."""

    def reset(self) -> None:
        """Forget the whole running set (after a failed step)."""

    def kv_bytes(self) -> int:
        """Bytes the running set's KV holds now, padding and spare room included."""
