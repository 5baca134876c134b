"""Attention without padding: packed prefill, and decode over each row's own pages.

Prefill: the batch's prompts (or the next chunk of a long one) are packed one after another (no padding); each
sequence attends causally to itself only, the positions it already has in the pool included. On the CPU a
compiled kernel (``csrc/prefill_attention.cpp``) does it for the whole batch at once, reading keys and values
from the pool: 1.25x torch's flash SDPA here on a 2,000-token prompt, 2x on 300-token ones; elsewhere, or where
it cannot be built, each sequence runs one causal SDPA over its own queries, keys and values (gathered from its
pages when it has a context).

Decode: every row has one query and a different number of cached positions, in pages of the pool.
On the CPU a compiled kernel (``csrc/paged_attention.cpp``) reads each row's pages once, in place, with
an online softmax. Elsewhere, or where it cannot be built, torch ops do it: the step gathers each row's pages (``DecodeLayout``, built once per step and shared by every layer),
scores each page against its row's query in one batched matmul, and combines the pages of a row with
a segmented softmax: each page's max, sum and weighted values are laid out ``[rows, most pages]`` (a
page's worth of numbers per page, so that padding is tiny) and reduced per row. Nothing is read for
positions a row does not have, except the unfilled tail of its last page, which is masked and counted
as padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def prefill_kernel_covers(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the compiled prefill kernel runs this dtype and head size (else: SDPA per sequence)."""
    return dtype in (torch.float32, torch.bfloat16) and head_dim in (64, 128)


@dataclass
class PrefillLayout:
    """Where a prefill step's sequences are: each computes ``lengths`` new positions (a whole prompt, or the next
    chunk of one) after the ``contexts`` it already has in the pool, all in pages ``tables``."""

    lengths: list[int]
    contexts: list[int]
    tables: torch.Tensor
    """``[sequences, most_pages]`` int64: each sequence's pages, covering its context and its new positions."""

    @classmethod
    def build(cls, tables: list[list[int]], lengths: list[int], contexts: list[int],
              device: torch.device) -> "PrefillLayout":
        most = max(map(len, tables), default=0)
        return cls(lengths, contexts, torch.tensor([t + [0] * (most - len(t)) for t in tables], dtype=torch.long,
                                                   device=device).view(len(tables), most))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefillLayout,
                      key_pool: torch.Tensor | None, value_pool: torch.Tensor | None, scale: float,
                      kernel: Any = None) -> torch.Tensor:
    """``q`` ``[tokens, heads, dim]``, ``k``/``v`` ``[tokens, kv_heads, dim]``: the new positions of sequences packed
    back to back, whose keys and values are already written to ``key_pool``/``value_pool`` ``[pages, kv_heads,
    page_size, dim]``; returns ``[tokens, heads, dim]``, each position attending causally to its own sequence (its
    context included). Rows past the last sequence (padding) come out zero. ``kernel``: the compiled CPU kernels,
    used where they cover the shape; a sequence without context needs no pool on the torch path."""
    if kernel is not None and prefill_kernel_covers(q.dtype, q.shape[-1]):
        assert key_pool is not None and value_pool is not None
        return kernel.prefill_attention(q, key_pool, value_pool, layout.tables, layout.lengths, layout.contexts, scale)
    out = torch.empty_like(q) if q.shape[0] == sum(layout.lengths) else torch.zeros_like(q)
    gqa = q.shape[1] != k.shape[1]
    start = 0
    for i, (n, context) in enumerate(zip(layout.lengths, layout.contexts)):
        end = start + n
        # a batch dimension of 1: with 3-d inputs torch takes its slow math path instead of flash attention
        qs = q[None, start:end].transpose(1, 2)
        if context:  # the keys before this chunk are in the pool: gather the sequence's pages, then mask causally
            assert key_pool is not None and value_pool is not None
            total, pages = context + n, layout.tables[i]
            ks, vs = (pool.index_select(0, pages).transpose(0, 1).flatten(1, 2)[None, :, :total]
                      for pool in (key_pool, value_pool))
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(context)
            attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            ks, vs = (t[None, start:end].transpose(1, 2) for t in (k, v))
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        out[start:end] = attended[0].transpose(0, 1)
        start = end
    return out


@dataclass
class DecodeLayout:
    """Which pages each decode row reads, built once per step and shared by every layer."""

    tables: torch.Tensor
    """``[rows, most_pages]`` int64: each row's pages (unused entries 0)."""
    lengths: torch.Tensor
    """``[rows]`` int64: each row's positions, the one written this step included."""
    pages: torch.Tensor | None
    """``[P]``: the pages of every row, row after row (the torch-ops path only, as the three below)."""
    row_of_page: torch.Tensor | None
    """``[P]``: the row each page belongs to."""
    valid: torch.Tensor | None
    """``[P, page_size]``: which slots of each page hold a position of its row."""
    slot: torch.Tensor | None
    """``[P]``: where each page's statistics go in a ``[rows x most_pages]`` layout (row-major)."""
    most_pages: int
    rows: int
    real_positions: int
    read_positions: int

    @classmethod
    def build(cls, tables: list[tuple[list[int], int]], page_size: int, device: torch.device,
              gather: bool = True) -> "DecodeLayout":
        """``tables``: each row's (pages, length), the length counting the token written this step.
        ``gather``: also what the torch-ops path needs (the compiled kernel reads ``tables`` only)."""
        most = max(-(-length // page_size) for _, length in tables)
        used = [-(-length // page_size) for _, length in tables]
        lengths = [length for _, length in tables]
        padded = [row_pages[:n] + [0] * (most - n) for (row_pages, _), n in zip(tables, used)]
        layout = cls(torch.tensor(padded, device=device), torch.tensor(lengths, device=device), *([None] * 4),
                     most, len(tables), sum(lengths), sum(used) * page_size)
        if gather:
            pages = [p for (row_pages, _), n in zip(tables, used) for p in row_pages[:n]]
            owners = [row for row, n in enumerate(used) for _ in range(n)]
            fill = [f for n, length in zip(used, lengths) for f in [page_size] * (n - 1) + [length - (n - 1) * page_size]]
            slot = [s for row, n in enumerate(used) for s in range(row * most, row * most + n)]
            layout.pages, layout.row_of_page = torch.tensor(pages, device=device), torch.tensor(owners, device=device)
            layout.valid = (torch.arange(page_size)[None, :] < torch.tensor(fill)[:, None]).to(device)
            layout.slot = torch.tensor(slot, device=device)
        return layout

    def per_row(self, per_page: torch.Tensor, fill: float, reduce: str) -> torch.Tensor:
        """Reduce ``[P, ...]`` page statistics to ``[rows, ...]`` (``amax`` or ``sum``) in a fixed order."""
        laid = per_page.new_full((self.rows * self.most_pages, *per_page.shape[1:]), fill)
        laid.index_copy_(0, self.slot, per_page)
        laid = laid.view(self.rows, self.most_pages, *per_page.shape[1:])
        return laid.amax(dim=1) if reduce == "amax" else laid.sum(dim=1)


def decode_attention(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, layout: DecodeLayout,
                     scale: float, kernel: Any = None) -> torch.Tensor:
    """``q`` ``[rows, heads, dim]`` against each row's pages of ``key_pool``/``value_pool``
    ``[pages, kv_heads, page_size, dim]``; returns ``[rows, heads, dim]``. ``kernel``: the compiled CPU
    kernel (``kernels.py``), which reads each page once in place; without it, torch ops gather the pages."""
    if kernel is not None:
        return kernel.paged_decode_attention(q.contiguous(), key_pool, value_pool, layout.tables, layout.lengths, scale)
    rows, heads, dim = q.shape
    kv_heads = key_pool.shape[1]
    group = heads // kv_heads
    keys = key_pool.index_select(0, layout.pages)  # [P, kv_heads, page, dim]
    values = value_pool.index_select(0, layout.pages)
    queries = q.view(rows, kv_heads, group, dim).index_select(0, layout.row_of_page)  # [P, kv_heads, group, dim]
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale  # [P, kv_heads, group, page]
    scores.masked_fill_(~layout.valid[:, None, None, :], float("-inf"))
    row_max = layout.per_row(scores.amax(dim=-1), float("-inf"), "amax")  # [rows, kv_heads, group]
    weights = torch.exp(scores - row_max.index_select(0, layout.row_of_page)[..., None])
    row_sum = layout.per_row(weights.sum(dim=-1), 0.0, "sum")
    partial = torch.matmul(weights.to(values.dtype), values)  # [P, kv_heads, group, dim]
    out = layout.per_row(partial, 0.0, "sum")
    return (out / row_sum[..., None].to(out.dtype)).view(rows, heads, dim).to(q.dtype)
