"""The padded KV cache of the transformers executor: merge, select, split and roll back keep every row exact."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from bucketserve.executor.padded_kv import PaddedKVCache

GROWTH = 4


def cache(lengths: list[int], layers: int = 2) -> PaddedKVCache:
    """Rows whose real positions hold the row's length as value, so moves can be traced."""
    length = max(lengths)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    keys = torch.zeros(len(lengths), 1, length, 2)
    for row, n in enumerate(lengths):
        mask[row, length - n:] = 1
        keys[row, :, length - n:, :] = n
    return PaddedKVCache(DynamicCache([(keys.clone(), keys.clone()) for _ in range(layers)]), mask, GROWTH)


def test_merge_left_pads_the_shorter_side():
    a, b = cache([3, 5]), cache([8])
    a.merge(b)
    assert a.mask.tolist() == [[0] * 5 + [1] * 3, [0] * 3 + [1] * 5, [1] * 8]
    assert a.cache.layers[1].keys.shape == (3, 1, 8, 2)
    assert a.cache.layers[0].keys[0, 0, :, 0].tolist() == [0.0] * 5 + [3.0] * 3
    assert a.positions().tolist() == [[3], [5], [8]]


def test_select_frees_rows_and_compacts_padding():
    kv = cache([2, 9, 4])
    kv.select([0, 2])  # the long row leaves; the columns only it used go too
    assert kv.length == 4 and kv.batch_size == 2
    assert kv.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert kv.cache.layers[0].keys[1, 0, :, 0].tolist() == [4.0] * 4
    assert kv.nbytes() == 2 * 2 * (2 * 1 * (4 + GROWTH) * 2) * 4  # layers x (k, v) x slab x fp32
    assert kv.padding_ratio() == 0.25


def test_decode_writes_in_place_until_the_spare_room_is_used():
    kv = cache([1, 3])
    layer = kv.cache.layers[0]
    slab = layer.slab_k
    for step in range(GROWTH):
        assert kv.append_column().shape == (2, 4 + step)
        keys, _ = layer.update(torch.full((2, 1, 1, 2), 7.0), torch.full((2, 1, 1, 2), 7.0))
        assert layer.slab_k is slab and keys.shape[2] == 4 + step
    keys, _ = layer.update(torch.full((2, 1, 1, 2), 8.0), torch.full((2, 1, 1, 2), 8.0))
    assert layer.slab_k is not slab and layer.get_seq_length() == 3 + GROWTH + 1
    assert keys[1, 0, :, 0].tolist() == [3.0] * 3 + [7.0] * GROWTH + [8.0]
