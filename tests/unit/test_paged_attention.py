"""The paged KV pool and attention without padding, against plain SDPA over each sequence alone."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from bucketserve.executor.attention import DecodeLayout, PrefillLayout, decode_attention, prefill_attention
from bucketserve.executor.kernels import cpu_kernels
from bucketserve.executor.kv_cache import OutOfPages, PagedKVPool


def pool(num_pages: int = 64, page: int = 4, kv_heads: int = 2, dim: int = 8,
         dtype: torch.dtype = torch.float32) -> PagedKVPool:
    return PagedKVPool(layers=1, kv_heads=kv_heads, head_dim=dim, page_size=page, num_pages=num_pages,
                       dtype=dtype, device=torch.device("cpu"))


def test_pages_are_taken_as_sequences_grow_and_given_back_when_they_end():
    p = pool(num_pages=5, page=4)
    assert len(p.reserve(1, 5).pages) == 2 and p.used_pages == 2
    assert p.reserve(1, 8).pages == p.tables[1].pages and p.used_pages == 2  # still two pages
    p.reserve(2, 12)
    with pytest.raises(OutOfPages):
        p.reserve(3, 1)
    p.free(1)
    assert p.used_pages == 3 and len(p.reserve(3, 8).pages) == 2
    p.free_all()
    assert p.used_pages == 0 and p.nbytes() == 0


@pytest.fixture(scope="module", params=["torch", "cpp"])
def kernel(request):
    """Decode attention through torch ops, and through the compiled CPU kernel (which must build here)."""
    if request.param == "torch":
        return None
    built = cpu_kernels(log=print)
    assert built is not None, "the CPU kernels did not build"
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [2, 4])  # 4 query heads on 2 kv heads: grouped-query attention
@pytest.mark.parametrize("dim", [8, 64, 128])  # the kernel has vector paths for 64 and 128, a plain one else
def test_decode_attention_over_pages_equals_sdpa_per_row(heads, dim, dtype, kernel):
    torch.manual_seed(0)
    rng = random.Random(0)
    p = pool(num_pages=200, page=4, dim=dim, dtype=dtype)
    p.keys[0].normal_()
    p.values[0].normal_()
    lengths = [1, 3, 4, 5, 17, 40]
    tables = []
    for seq, n in enumerate(lengths):  # pages handed out interleaved, so no row's pages are contiguous
        p.reserve(seq, n)
    for seq, n in enumerate(lengths):
        tables.append((p.tables[seq].pages, n))
    rng.shuffle(p._free)
    q = torch.randn(len(lengths), heads, dim, dtype=dtype)
    layout = DecodeLayout.build(tables, 4, torch.device("cpu"), gather=kernel is None)
    got = decode_attention(q, p.keys[0], p.values[0], layout, dim ** -0.5, kernel)
    for row, (pages, n) in enumerate(tables):
        k = p.keys[0][pages].transpose(0, 1).reshape(2, -1, dim)[:, :n]
        v = p.values[0][pages].transpose(0, 1).reshape(2, -1, dim)[:, :n]
        want = F.scaled_dot_product_attention(q[row][None, :, None], k[None], v[None], enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(got[row], want, **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))
    assert layout.real_positions == sum(lengths) and layout.read_positions == 4 * sum(-(-n // 4) for n in lengths)


def test_written_keys_land_in_their_pages_and_packed_prefill_stays_within_each_sequence():
    torch.manual_seed(1)
    p, dim = pool(page=4), 8
    lengths = [3, 6]
    p.reserve(0, 3)
    p.reserve(1, 6)
    pages, offsets = [], []
    for seq, n in enumerate(lengths):
        pg, off = p.slots(seq, 0, n)
        pages, offsets = pages + pg, offsets + off
    q, k, v = torch.randn(9, 2, dim), torch.randn(9, 2, dim), torch.randn(9, 2, dim)
    p.write(0, p.slot_index(pages, offsets), k, v)
    stored = p.keys[0][p.tables[1].pages].transpose(0, 1).reshape(2, -1, dim)[:, :6]
    torch.testing.assert_close(stored, k[3:].transpose(0, 1))
    both = PrefillLayout.build([p.tables[0].pages, p.tables[1].pages], lengths, [0, 0], q.device)
    out = prefill_attention(q, k, v, both, p.keys[0], p.values[0], dim ** -0.5)
    second = PrefillLayout.build([p.tables[1].pages], [6], [0], q.device)
    alone = prefill_attention(q[3:], k[3:], v[3:], second, p.keys[0], p.values[0], dim ** -0.5)
    torch.testing.assert_close(out[3:], alone)  # the second sequence never sees the first


def cached_prompts(totals: list[int], contexts: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                   padding: int = 5, page: int = 16):
    """Sequences of ``totals`` positions, all their keys and values written to a pool, of which this step computes
    the positions after ``contexts``: their q, k and v as the executor passes them (strided views of one fused
    projection, packed back to back, then rows of padding). Also each whole sequence's q, k and v."""
    p = pool(num_pages=sum(-(-t // page) for t in totals), page=page, kv_heads=kv_heads, dim=dim, dtype=dtype)
    whole = [torch.randn(t, heads + 2 * kv_heads, dim, dtype=dtype) for t in totals]
    for seq, (t, x) in enumerate(zip(totals, whole)):
        p.reserve(seq, t)
        p.write(0, p.slot_index(*p.slots(seq, 0, t)), x[:, heads:heads + kv_heads], x[:, heads + kv_heads:])
    new = torch.cat([x[c:] for x, c in zip(whole, contexts)] + [torch.randn(padding, heads + 2 * kv_heads, dim, dtype=dtype)])
    tokens = new.shape[0]
    qkv = new.reshape(tokens, -1)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1))
    layout = PrefillLayout.build([p.tables[seq].pages for seq in range(len(totals))],
                                 [t - c for t, c in zip(totals, contexts)], contexts, q.device)
    return p, q, k, v, layout, [x.split([heads, kv_heads, kv_heads], dim=1) for x in whole]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 2, 64), (4, 2, 128), (16, 2, 128)])
@pytest.mark.parametrize("on", ["kernel", "torch"])
def test_prefill_of_prompts_and_chunks_equals_causal_sdpa_over_each_whole_sequence(heads, kv_heads, dim, dtype, on):
    """Whole prompts (no context) and later chunks of prompts (their first positions already in the pool), with
    lengths around the kernel's blocks (64 to 1,024 new positions per job, by the query heads per kv head) and
    contexts around pages: each new position's output is its row of causal SDPA over its whole sequence, on the
    compiled kernel and on the torch path."""
    kernel = cpu_kernels(log=print) if on == "kernel" else None
    assert on == "torch" or kernel is not None, "the CPU kernels did not build"
    torch.manual_seed(3)
    totals = [1, 2, 63, 64, 65, 130, 7, 75, 200, 17, 1100, 1300]
    contexts = [0, 0, 0, 0, 0, 0, 0, 11, 128, 16, 0, 200]
    padding = 5
    p, q, k, v, layout, whole = cached_prompts(totals, contexts, heads, kv_heads, dim, dtype, padding)
    got = prefill_attention(q, k, v, layout, p.keys[0], p.values[0], dim ** -0.5, kernel)
    assert got.shape == q.shape and not got[-padding:].any()
    start = 0
    for (qs, ks, vs), total, context in zip(whole, totals, contexts):
        n = total - context
        qs, ks, vs = (t[None].transpose(1, 2).float() for t in (qs, ks, vs))
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[start:start + n].float(), want[context:],
                                   **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_stores_what_index_copy_stores(dtype):
    """Keys and values as the executor passes them: strided views into the fused qkv projection's output."""
    kernel = cpu_kernels(log=print)
    assert kernel is not None, "the CPU kernels did not build"
    torch.manual_seed(2)
    heads, kv_heads, dim = 4, 2, 8
    by_torch, by_kernel = pool(dim=dim, dtype=dtype), pool(dim=dim, dtype=dtype)
    by_kernel.kernels = kernel
    for p in (by_torch, by_kernel):
        p.keys[0].zero_()
        p.values[0].zero_()
        p.reserve(0, 5)
        p.reserve(1, 9)
    pages, offsets = [], []
    for seq, n in ((0, 5), (1, 9)):
        pg, off = by_torch.slots(seq, 0, n)
        pages, offsets = pages + pg, offsets + off
    qkv = torch.randn(14, (heads + 2 * kv_heads) * dim, dtype=dtype)
    _, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    k, v = k.view(14, kv_heads, dim), v.view(14, kv_heads, dim)
    slots = by_torch.slot_index(pages, offsets)
    by_torch.write(0, slots, k, v)
    by_kernel.write(0, slots, k, v)
    assert torch.equal(by_kernel.keys[0], by_torch.keys[0]) and torch.equal(by_kernel.values[0], by_torch.values[0])
    assert by_kernel.keys[0].count_nonzero() == 14 * kv_heads * dim  # every row written, nothing else
    with pytest.raises(RuntimeError, match="outside the pool"):
        by_kernel.write(0, torch.full_like(slots, by_kernel.keys[0].numel() // dim), k, v)
