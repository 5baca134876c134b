"""The fused CPU kernels for a layer's elementwise steps, against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bucketserve.executor.kernels import cpu_kernels
from bucketserve.executor.llama import rms_norm, rotate_half


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels(log=print)
    assert built is not None, "the CPU kernels did not build"
    return built


@pytest.mark.parametrize("width", [64, 1000, 1027])  # vector lanes only, and a scalar tail
def test_rms_norm_with_the_residual_add_fused(kernels, width):
    torch.manual_seed(0)
    x, delta, weight = torch.randn(37, width) * 3, torch.randn(37, width), torch.randn(width)
    residual = x.clone()
    out = kernels.rms_norm(residual, delta, weight, 1e-6)
    assert torch.equal(residual, x + delta)  # the residual stream is updated in place
    torch.testing.assert_close(out, rms_norm(x + delta, weight, 1e-6), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, None, weight, 1e-6), rms_norm(x, weight, 1e-6), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("width", [32, 1000, 1027])
def test_silu_mul_equals_torch_over_the_whole_range(kernels, width):
    torch.manual_seed(0)
    gate_up = torch.randn(19, 2 * width) * 10
    gate_up[0, :8] = torch.tensor([-1e4, -200.0, -90.0, -87.5, 0.0, 87.5, 200.0, 1e4])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("dim", [8, 64, 128])
def test_rope_in_place_on_the_q_and_k_heads_only(kernels, dim):
    torch.manual_seed(0)
    tokens, heads, kv_heads = 5, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(tokens).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotated = qkv.clone()
    kernels.rope_(rotated, cos, sin, heads + kv_heads, dim)
    qk = qkv[:, :(heads + kv_heads) * dim].view(tokens, -1, dim)
    want = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
    torch.testing.assert_close(rotated[:, :(heads + kv_heads) * dim].view(tokens, -1, dim), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(rotated[:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # v untouched


def test_kernels_refuse_what_they_cannot_compute(kernels):
    with pytest.raises(RuntimeError, match="contiguous 2-d float32"):
        kernels.silu_mul(torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one value per column"):
        kernels.rms_norm(torch.randn(4, 8), None, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.rope_(torch.randn(4, 8), torch.randn(4, 6), torch.randn(4, 6), 1, 8)
