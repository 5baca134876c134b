"""The paged KV pool: allocated once from the KV budget, handed out a page at a time.

Each layer keeps keys and values in ``[pages, kv_heads, page_size, head_dim]`` tensors; a sequence
owns a list of pages (its page table) and a length. Joining or leaving the running set copies
nothing: a sequence takes free pages as it grows and gives them back when it ends. Only the pages a
sequence reaches are ever written, so the pool costs memory as it is used even though it is sized
for the whole budget at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class OutOfPages(RuntimeError):
    """The pool has no free page: admission let more in than the budget holds (a bug, not a load)."""


@dataclass
class PageTable:
    pages: list[int] = field(default_factory=list)
    length: int = 0
    """Positions written (the prompt, then one per decoded token fed back)."""


class PagedKVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, page_size: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device, kernels: Any = None):
        self.kernels = kernels if device.type == "cpu" else None
        """The compiled CPU kernels (their ``kv_write``), or None: torch's ``index_copy_``."""
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_pages, kv_heads, page_size, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.page_bytes = 2 * layers * kv_heads * page_size * head_dim * dtype.itemsize
        self._free = list(range(num_pages - 1, -1, -1))
        self.tables: dict[int, PageTable] = {}

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def nbytes(self) -> int:
        """Bytes of the pages sequences hold now (the pool's untouched pages cost nothing)."""
        return self.used_pages * self.page_bytes

    def reserve(self, seq: int, length: int) -> PageTable:
        """Make ``seq``'s pages cover ``length`` positions; pages it already has are kept."""
        table = self.tables.setdefault(seq, PageTable())
        need = -(-length // self.page_size) - len(table.pages)
        if need > len(self._free):
            raise OutOfPages(f"the KV pool has {len(self._free)} free pages, {need} more needed")
        for _ in range(need):
            table.pages.append(self._free.pop())
        return table

    def truncate(self, seq: int, length: int) -> None:
        """Give back ``seq``'s pages past its first ``length`` positions (all of them, and its table, at 0)."""
        table = self.tables.get(seq)
        if table is None:
            return
        if length <= 0:
            self.free(seq)
            return
        keep = -(-length // self.page_size)
        self._free.extend(reversed(table.pages[keep:]))
        del table.pages[keep:]
        table.length = min(table.length, length)

    def free(self, seq: int) -> None:
        table = self.tables.pop(seq, None)
        if table is not None:
            self._free.extend(reversed(table.pages))

    def free_all(self) -> None:
        for seq in list(self.tables):
            self.free(seq)

    def slots(self, seq: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """(page, offset) of positions ``start..end-1`` of ``seq``."""
        pages, size = self.tables[seq].pages, self.page_size
        return [pages[p // size] for p in range(start, end)], [p % size for p in range(start, end)]

    def slot_index(self, pages: list[int], offsets: list[int]) -> torch.Tensor:
        """Rows of the pool seen as ``[pages x kv_heads x page_size, head_dim]`` that tokens at (pages[i],
        offsets[i]) go to, head by head: built once per step, used by every layer's ``write``."""
        kv_heads = self.keys[0].shape[1]
        page = torch.tensor(pages, device=self.keys[0].device)[:, None]
        heads = torch.arange(kv_heads, device=page.device)[None, :]
        offset = torch.tensor(offsets, device=page.device)[:, None]
        return ((page * kv_heads + heads) * self.page_size + offset).reshape(-1)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[tokens, kv_heads, head_dim]`` at ``slots`` (from ``slot_index``)."""
        if self.kernels is not None:
            self.kernels.kv_write(self.keys[layer], self.values[layer], slots, keys, values)
            return
        dim = keys.shape[-1]
        self.keys[layer].view(-1, dim).index_copy_(0, slots, keys.reshape(-1, dim))
        self.values[layer].view(-1, dim).index_copy_(0, slots, values.reshape(-1, dim))
