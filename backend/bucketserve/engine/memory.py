"""KV-cache memory: what a sequence costs, what the machine can give, and how many fit (N_max).

Two cache layouts, one per kind of executor:

- padded (the transformers executor): the running set shares caches whose rows are all as long as the
  longest plus the spare room each slab keeps (``kv_cache_growth``), so a set of sequences needs at most
  ``rows x (longest prompt + max_tokens + spare) x bytes per token``;
- paged (our Llama-family executor): each sequence holds pages of ``page_size`` positions, so it needs
  ``ceil((prompt + max_tokens) / page_size)`` pages whoever else runs.

Admission checks that bound for the running set plus a candidate batch before the batch is
prefilled: admission, not luck, keeps the cache inside the budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from bucketserve.engine.request import Request


@dataclass(frozen=True)
class KVCostModel:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position in every layer (the paper's per-token KV cost)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_model_config(cls, config: Any, dtype_bytes: int) -> "KVCostModel":
        """From a Hugging Face config; grouped-query models cache only their kv heads."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(int(config.num_hidden_layers), kv_heads, head_dim, dtype_bytes)


def final_length(request: Request) -> int:
    """Positions the request can ever hold in the cache: its prompt plus every token it may generate."""
    return request.prompt_len + request.sampling.max_tokens


@dataclass(frozen=True)
class Usage:
    """What a set of sequences reserves: enough to price it under either layout."""

    rows: int = 0
    longest: int = 0
    """Positions of the longest sequence (prompt + max_tokens)."""
    paged_positions: int = 0
    """Positions of all sequences, each rounded up to whole pages."""


@dataclass(frozen=True)
class KVBudget:
    bytes_per_token: int
    budget_bytes: int
    """M_safe: the most bytes the running set's KV may hold."""
    spare: int = 0
    """Padded layout: positions each slab keeps beyond its filled length (``kv_cache_growth``)."""
    page_size: int = 0
    """Paged layout: positions per page; 0 means the padded layout."""

    def positions(self, length: int) -> int:
        """Positions one sequence of ``length`` occupies on its own: whole pages, or its length plus spare."""
        if self.page_size:
            return -(-length // self.page_size) * self.page_size
        return length + self.spare

    def plus(self, usage: Usage, request: Request) -> Usage:
        n = final_length(request)
        return Usage(usage.rows + 1, max(usage.longest, n), usage.paged_positions + self.positions(n))

    def usage(self, requests: Iterable[Request]) -> Usage:
        """``plus`` over ``requests`` from nothing, in one pass (called every step over the running set)."""
        lengths = list(map(final_length, requests))
        if not lengths:
            return Usage()
        return Usage(len(lengths), max(lengths), sum(map(self.positions, lengths)))

    def bytes_of(self, usage: Usage) -> int:
        """The most bytes these sequences' cache can reach before the first of them finishes."""
        if self.page_size:
            return usage.paged_positions * self.bytes_per_token
        return 0 if usage.rows == 0 else usage.rows * (usage.longest + self.spare) * self.bytes_per_token

    def reserved(self, requests: Iterable[Request]) -> int:
        return self.bytes_of(self.usage(requests))

    def fits(self, requests: Iterable[Request]) -> bool:
        return self.reserved(requests) <= self.budget_bytes

    def seqs_that_fit(self, longest: int) -> int:
        """How many sequences reaching ``longest`` positions the budget holds (the memory side of N_max)."""
        return max(0, self.budget_bytes // (self.positions(longest) * self.bytes_per_token))


def available_ram() -> int:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def safe_budget(safety: float, kv_cache_bytes: int, memory_fraction: float, device_free: int | None) -> int:
    """M_safe = safety x M_remaining, where M_remaining is ``kv_cache_bytes`` when set, else the
    accelerator's free memory after weights and a worst-case forward, else a fraction of free RAM."""
    if kv_cache_bytes:
        remaining = kv_cache_bytes
    elif device_free is not None:
        remaining = device_free
    else:
        remaining = int(memory_fraction * available_ram())
    return int(safety * remaining)
