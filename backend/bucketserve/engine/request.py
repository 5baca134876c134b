"""One request's state: what was asked (sampling, priority, deadline), what has been generated, and when.

Every front end (Triton, the OpenAI gateway through Triton, ``LLM`` in process) builds the same
``SamplingParams`` and ``Priority``; their constructors are the one place a bad value becomes a clear
``InvalidInput`` message for the client.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class InvalidInput(ValueError):
    """The request is malformed; the message says what is wrong and goes back to that one client."""


class Priority(enum.IntEnum):
    """A request's class. Online requests are latency-sensitive (oldest first); offline ones are batch
    work (shortest or longest job first). The values are the wire values of the ``priority`` input."""

    ONLINE = 0
    OFFLINE = 1

    @classmethod
    def parse(cls, value: int) -> "Priority":
        try:
            return cls(value)
        except ValueError:
            raise InvalidInput(f"priority must be one of {tuple(int(p) for p in cls)} (0 online, 1 offline), "
                               f"got {value}") from None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"
    ERROR = "error"
    DEADLINE = "deadline"  # its timeout passed, or its first token could no longer come within slo_ms


MAX_LOGPROBS = 20
"""The most alternatives a request may ask for per token (vLLM's default ``max_logprobs``, OpenAI's limit)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop: the fields of the Triton interface and vLLM's."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the request like EOS (also with ``ignore_eos``), not before ``min_tokens``."""
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's and vLLM's meaning)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence of a token in the output."""
    repetition_penalty: float = 1.0
    """Divides positive and multiplies negative logits of tokens in the prompt or the output (> 1 repeats less)."""
    logprobs: int | None = None
    """Return each generated token's log probability and this many most likely alternatives (0: none)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def __post_init__(self) -> None:
        """A SamplingParams cannot exist with a bad value: ``InvalidInput`` names the first one."""
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidInput(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidInput(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidInput(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise InvalidInput(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidInput(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidInput(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")


def check_slo_ms(slo_ms: int | None) -> None:
    if slo_ms is not None and slo_ms < 1:
        raise InvalidInput(f"slo_ms must be >= 1, got {slo_ms}")


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: Priority = Priority.ONLINE
    slo_ms: int | None = None
    timeout_ms: float | None = None
    """The whole request must end by then (Triton's request timeout)."""
    id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    prompt_len: int = field(init=False)
    """len(prompt_ids), read many times per scheduling decision."""
    prefilled: int = 0
    """Prompt positions whose KV the executor holds: below ``prompt_len`` while a long prompt is prefilled in
    chunks, one per step."""
    prefill_to: int = 0
    """The prompt position this step's prefill reaches (the scheduler sets it each step the request is prefilled)."""

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_ids)

    @property
    def prefill_end(self) -> int:
        """Where this step's prefill of the request stops (``prefill_to``; the whole prompt when unset)."""
        return self.prefill_to or self.prompt_len

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    def append_token(self, token: int, eos_ids: frozenset[int], now: float | None = None) -> FinishReason | None:
        """Record a generated token (at ``now``, default the monotonic clock); return why the request is done, if it is."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic() if now is None else now
        self.output_ids.append(token)
        s = self.sampling
        ends = token in s.stop_token_ids or (not s.ignore_eos and token in eos_ids)
        if ends and self.num_output >= s.min_tokens:
            return FinishReason.STOP
        if self.num_output >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        return None

    def expires_at(self, slo_expiry: float) -> float | None:
        """The first moment ``missed_deadline`` can name a reason while no token has come (None: never)."""
        limits = [self.timeout_ms]
        if slo_expiry and self.slo_ms is not None and self.first_token_time is None:
            limits.append(slo_expiry * self.slo_ms)
        ms = min((m for m in limits if m is not None), default=None)
        return None if ms is None else self.arrival_time + ms / 1000

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

    def finish(self, reason: FinishReason, now: float | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic() if now is None else now
