"""Seeded benchmark workloads: prompt and output lengths, priority classes, and prompts of real text.

Lengths come from the paper's data sets, described by median and mean (a lognormal fits both):
Alpaca prompts have median 69 and mean 83.7 tokens; LongBench prompts median 41,417 and mean
55,749, which we scale so the median sits at ``LONG_MEDIAN_SHARE`` of the model's context and
truncate (as the paper does) so prompt plus output fits it. ``mixed`` draws a share
``long_share`` of its requests from LongBench and the rest from Alpaca. ``peers`` is
the workload of docs/peers.md: prompts uniform in 19..506 tokens, exactly 64 output tokens.

Lengths are plain numbers, so this module needs no tokenizer; ``materialize`` turns them into
text of that many tokens under the model's tokenizer.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

WORKLOADS = ("alpaca", "longbench", "mixed", "peers")
ALPACA_PROMPT = (69.0, 83.7)
"""(median, mean) prompt tokens of Alpaca, as the paper reports them."""
LONGBENCH_PROMPT = (41_417.0, 55_749.0)
LONG_MEDIAN_SHARE = 0.4
"""LongBench's median prompt lands at this share of the model's context."""
ALPACA_OUTPUT = (48.0, 64.0)
"""Alpaca's reference answers: a few sentences (our estimate; the paper does not say)."""
LONGBENCH_OUTPUT = (32.0, 48.0)
"""LongBench answers are short (QA, few-shot) to a paragraph (summaries)."""
MIN_PROMPT, MAX_OUTPUT = 4, 512


@dataclass(frozen=True)
class PriorityClass:
    """A traffic class: its share of requests, the server priority it maps to, and its SLOs."""

    name: str
    share: float
    ttft_ms: float
    e2e_ms: float
    priority: int = 0  # the server's class: 0 online, 1 offline

    @classmethod
    def parse(cls, text: str) -> PriorityClass:
        """``NAME:SHARE:TTFT_MS:E2E_MS``; a name starting with "offline" maps to priority 1."""
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"a class is NAME:SHARE:TTFT_MS:E2E_MS, got {text!r}")
        name, share, ttft, e2e = parts[0], float(parts[1]), float(parts[2]), float(parts[3])
        if share < 0 or ttft <= 0 or e2e <= 0:
            raise ValueError(f"class {name}: share must be >= 0 and SLOs > 0, got {text!r}")
        return cls(name, share, ttft, e2e, 1 if name.startswith("offline") else 0)


DEFAULT_CLASSES = (PriorityClass("online", 0.5, 1_000, 10_000, 0), PriorityClass("offline", 0.5, 10_000, 60_000, 1))
"""Interactive requests want a first token within a second; batch jobs tolerate ten (our choice: the paper
gives no thresholds)."""


@dataclass(frozen=True)
class RequestSpec:
    prompt_len: int
    output_len: int
    cls: PriorityClass
    prompt: str | None = None
    """The text, once materialized (or given by a workload file)."""
    deadline: bool = True
    """Whether a Triton target sends the class's TTFT SLO as ``slo_ms``, which the server also enforces
    (``slo_expiry``). Off in the offline throughput run, where every request must finish."""

    @property
    def slo_ms(self) -> int | None:
        """The ``slo_ms`` the request carries: its class's TTFT SLO, when it has a deadline."""
        return max(1, round(self.cls.ttft_ms)) if self.deadline else None


def lognormal(rng: random.Random, median: float, mean: float) -> float:
    """A draw from the lognormal with this median and mean (mean > median)."""
    sigma = math.sqrt(2 * math.log(mean / median))
    return rng.lognormvariate(math.log(median), sigma)


def _fit(prompt: float, output: float, max_len: int) -> tuple[int, int]:
    """Round, clip the output, then truncate the prompt so prompt + output fits the context."""
    out = max(1, min(round(output), MAX_OUTPUT, max_len // 4))
    return max(MIN_PROMPT, min(round(prompt), max_len - out - 1)), out


def _alpaca(rng: random.Random, max_len: int) -> tuple[int, int]:
    return _fit(lognormal(rng, *ALPACA_PROMPT), lognormal(rng, *ALPACA_OUTPUT), max_len)


def _longbench(rng: random.Random, max_len: int) -> tuple[int, int]:
    scale = LONG_MEDIAN_SHARE * max_len / LONGBENCH_PROMPT[0]
    return _fit(scale * lognormal(rng, *LONGBENCH_PROMPT), lognormal(rng, *LONGBENCH_OUTPUT), max_len)


def _peers(rng: random.Random, max_len: int) -> tuple[int, int]:
    return _fit(rng.randint(19, 506), 64, max_len)


def lengths(workload: str, n: int, max_len: int, seed: int, long_share: float = 0.2) -> list[tuple[int, int]]:
    """``n`` (prompt_len, output_len) pairs; the same seed gives the same list."""
    draw: dict[str, Callable[[random.Random, int], tuple[int, int]]] = {
        "alpaca": _alpaca, "longbench": _longbench, "peers": _peers}
    rng = random.Random(seed)
    if workload == "mixed":
        return [(_longbench if rng.random() < long_share else _alpaca)(rng, max_len) for _ in range(n)]
    if workload not in draw:
        raise ValueError(f"unknown workload {workload!r}; one of {WORKLOADS}")
    return [draw[workload](rng, max_len) for _ in range(n)]


def assign_classes(pairs: list[tuple[int, int]], classes: tuple[PriorityClass, ...], seed: int) -> list[RequestSpec]:
    """Each request draws its class by share, from its own seeded stream (lengths stay independent)."""
    rng = random.Random(seed + 1)
    weights = [c.share for c in classes]
    return [RequestSpec(p, o, rng.choices(classes, weights)[0]) for p, o in pairs]


def generate(workload: str, n: int, max_len: int, seed: int, long_share: float = 0.2,
             classes: tuple[PriorityClass, ...] = DEFAULT_CLASSES) -> list[RequestSpec]:
    return assign_classes(lengths(workload, n, max_len, seed, long_share), classes, seed)


def load_file(path: Path, classes: tuple[PriorityClass, ...] = DEFAULT_CLASSES) -> list[RequestSpec]:
    """A JSONL trace: each line ``{"prompt" | "prompt_len", "output_len", "priority"?, "slo_ms"?}``.

    ``priority`` names a class of ``classes`` (or is its server priority, 0 or 1); ``slo_ms``, if
    given, overrides that class's time-to-first-token SLO for the one request.
    """
    by_name = {c.name: c for c in classes}
    by_priority = {c.priority: c for c in reversed(classes)}
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        unknown = set(row) - {"prompt", "prompt_len", "output_len", "priority", "slo_ms"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if ("prompt" in row) == ("prompt_len" in row):
            raise ValueError(f"{where}: give exactly one of prompt and prompt_len")
        if not isinstance(row.get("output_len"), int) or row["output_len"] < 1:
            raise ValueError(f"{where}: output_len must be a positive integer")
        priority = row.get("priority", classes[0].name)
        cls = by_name.get(priority) if isinstance(priority, str) else by_priority.get(priority)
        if cls is None:
            raise ValueError(f"{where}: priority {priority!r} is none of {sorted(by_name)} or their priorities")
        if "slo_ms" in row:
            cls = replace(cls, ttft_ms=float(row["slo_ms"]))
        prompt = row.get("prompt")
        specs.append(RequestSpec(int(row.get("prompt_len", 0)), row["output_len"], cls, prompt))
    if not specs:
        raise ValueError(f"{path}: no requests")
    return specs


class PromptMaker:
    """Windows of real text (Python's standard library) of an exact token length under a tokenizer."""

    def __init__(self, tokenizer: Any, corpus_text: str):
        self.tokenizer = tokenizer
        self.ids: list[int] = tokenizer(corpus_text, add_special_tokens=False, verbose=False).input_ids
        self.special = len(tokenizer("").input_ids)  # BOS and the like, added to every prompt

    def count(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def make(self, n_tokens: int, rng: random.Random) -> str:
        """Text whose tokenization (special tokens included) is ``n_tokens`` long, or within a token or two:
        decoding a window and tokenizing it again can merge tokens at its edges, so the window is
        corrected a few times."""
        want = max(1, n_tokens - self.special)
        if want >= len(self.ids):
            raise ValueError(f"a {n_tokens}-token prompt is longer than the text corpus ({len(self.ids)} tokens)")
        start = rng.randrange(len(self.ids) - want)
        size = want
        text = ""
        for _ in range(4):
            text = self.tokenizer.decode(self.ids[start:start + size])
            error = self.count(text) - n_tokens
            if error == 0 or not 0 < size - error < len(self.ids) - start:
                break
            size -= error
        return text


def materialize(specs: list[RequestSpec], maker: PromptMaker, seed: int) -> list[RequestSpec]:
    """Give each spec without text a prompt of its length; specs with text get their measured length."""
    rng = random.Random(seed + 2)
    return [replace(s, prompt_len=maker.count(s.prompt)) if s.prompt is not None
            else replace(s, prompt=maker.make(s.prompt_len, rng)) for s in specs]
