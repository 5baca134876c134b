"""One request's state: what was asked, what has been generated, and when."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop word
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"
    ERROR = "error"
    DEADLINE = "deadline"  # its timeout passed, or its first token could no longer come within slo_ms


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class OutputOptions:
    """What the client wants back, beyond the text."""

    stream: bool = False
    exclude_input_in_output: bool = True
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    options: OutputOptions = OutputOptions()
    priority: int = 0
    slo_ms: int | None = None
    timeout_ms: float | None = None
    """Triton's request timeout: the whole request must end by then."""
    id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    def append_token(self, token: int, eos_ids: frozenset[int]) -> FinishReason | None:
        """Record a generated token; return why the request is done, if it is."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_ids.append(token)
        if not self.sampling.ignore_eos and token in eos_ids and self.num_output >= self.sampling.min_tokens:
            return FinishReason.STOP
        if self.num_output >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        return None

    def missed_deadline(self, now: float, slo_expiry: float) -> str | None:
        """Why the request can no longer meet its deadline (so computing on is waste), if it cannot."""
        waited_ms = (now - self.arrival_time) * 1000
        if self.timeout_ms is not None and waited_ms >= self.timeout_ms:
            return (f"deadline exceeded: the request's timeout of {self.timeout_ms:g} ms passed "
                    f"after {self.num_output} output tokens")
        if (slo_expiry and self.slo_ms is not None and self.first_token_time is None
                and waited_ms >= slo_expiry * self.slo_ms):
            return (f"deadline exceeded: no first token after {waited_ms:.0f} ms, past slo_ms {self.slo_ms} "
                    f"x slo_expiry {slo_expiry:g}")
        return None

    def finish(self, reason: FinishReason) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic()
