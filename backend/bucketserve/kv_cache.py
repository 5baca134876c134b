"""The running set's padded KV cache: left-padded rows that can merge, shrink and compact.

A padded (transformers) model keeps one KV tensor per layer of shape
``[batch, kv_heads, length, head_dim]``. Sequences of different lengths share it by left padding,
with an attention mask marking real positions. Continuous batching needs three operations on it:
``merge`` newly prefilled rows in (left-padding whichever side is shorter), ``select`` the rows
that are still running, and ``compact`` away leading columns that no row uses any more, so the
padding a long sequence caused leaves with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class PaddedKVCache:
    """KV tensors of the running set plus the mask of which positions are real."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise ValueError(f"unsupported KV cache layer {type(layer).__name__}: only full-attention models")
        self.cache = cache
        self.mask = mask

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> torch.Tensor:
        """Position id of the next token of each row: the count of its real tokens so far."""
        return self.mask.sum(dim=1, keepdim=True)

    def append_column(self) -> torch.Tensor:
        """Extend the mask by the token about to be decoded; return the mask the model needs."""
        ones = torch.ones((self.batch_size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def _left_pad(self, extra: int) -> None:
        if extra <= 0:
            return
        for layer in self.cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))
        self.mask = F.pad(self.mask, (extra, 0))

    def merge(self, other: "PaddedKVCache") -> None:
        """Append ``other``'s rows after ours, left-padding the shorter side to a common length."""
        length = max(self.length, other.length)
        self._left_pad(length - self.length)
        other._left_pad(length - other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns no remaining row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.compact()

    def compact(self) -> None:
        """Drop leading columns that are padding in every row."""
        if self.batch_size == 0:
            return
        leading = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if leading == 0:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, leading:, :].contiguous()
            layer.values = layer.values[:, :, leading:, :].contiguous()
        self.mask = self.mask[:, leading:].contiguous()

    def nbytes(self) -> int:
        """Bytes held by the KV tensors, padding included: what the memory budget must cover."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)

    def padding_ratio(self) -> float:
        """Share of cached positions that are padding."""
        total = self.mask.numel()
        return 0.0 if total == 0 else 1.0 - float(self.mask.sum()) / total
