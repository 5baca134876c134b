"""Test-only fault injection: make chosen forward passes fail, to prove a fault stays contained.

The operator (never a request) turns it on with ``$BUCKETSERVE_TEST_FAULTS``, a comma-separated list
of ``STAGE:KIND:TRIGGER`` rules:

- STAGE: ``prefill`` or ``decode``, the forward pass the rule watches;
- KIND: ``error`` (an exception, as a bug or a device fault would raise) or ``oom`` (out of memory);
- TRIGGER: ``text=MARKER`` (a row's prompt contains MARKER) or ``rows>N`` (the forward has more than
  N rows).

``prefill:error:text=BOOM`` fails every prefill batch holding a prompt with "BOOM";
``decode:oom:rows>2`` makes every decode forward of more than two rows run out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

ENV = "BUCKETSERVE_TEST_FAULTS"
STAGES = ("prefill", "decode")
KINDS = ("error", "oom")


class InjectedFault(RuntimeError):
    """The ``error`` kind: stands for any exception a forward pass may raise."""


class HasPrompt(Protocol):
    prompt: str


@dataclass(frozen=True)
class Rule:
    stage: str
    kind: str
    marker: str | None = None
    max_rows: int | None = None

    def fires(self, stage: str, rows: Sequence[HasPrompt]) -> bool:
        if stage != self.stage:
            return False
        if self.marker is not None:
            return any(self.marker in r.prompt for r in rows)
        return self.max_rows is not None and len(rows) > self.max_rows


def parse_rule(text: str) -> Rule:
    parts = text.strip().split(":", 2)
    if len(parts) != 3 or parts[0] not in STAGES or parts[1] not in KINDS:
        raise ValueError(f"{ENV}: {text!r} is not STAGE:KIND:TRIGGER with STAGE in {STAGES} and KIND in {KINDS}")
    stage, kind, trigger = parts
    if trigger.startswith("text=") and len(trigger) > 5:
        return Rule(stage, kind, marker=trigger[5:])
    if trigger.startswith("rows>") and trigger[5:].isdigit():
        return Rule(stage, kind, max_rows=int(trigger[5:]))
    raise ValueError(f"{ENV}: trigger {trigger!r} must be text=MARKER or rows>N")


class FaultPlan:
    """Called before every forward pass with its stage and rows; raises when a rule fires."""

    def __init__(self, rules: Sequence[Rule], oom_error: type[Exception]):
        self.rules = tuple(rules)
        self.oom_error = oom_error

    @classmethod
    def parse(cls, spec: str, oom_error: type[Exception]) -> "FaultPlan":
        return cls([parse_rule(part) for part in spec.split(",") if part.strip()], oom_error)

    def __call__(self, stage: str, rows: Sequence[HasPrompt]) -> None:
        for rule in self.rules:
            if rule.fires(stage, rows):
                message = f"injected {rule.kind} in {stage} of {len(rows)} rows ({ENV})"
                raise self.oom_error(message) if rule.kind == "oom" else InjectedFault(message)
