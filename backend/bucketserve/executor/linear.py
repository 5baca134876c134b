"""Linear layers: on the CPU through oneDNN with the weight prepacked once, else ``F.linear``.

fp32 ``F.linear`` goes through MKL, which on the CPUs we measured reaches half of what oneDNN does with
a prepacked weight (the ops Inductor itself emits for CPU linears: ``mkldnn._reorder_linear_weight``
and ``mkldnn._linear_pointwise``); oneDNN's rows also come out bitwise the same whatever the batch
size, so a request's tokens do not depend on its batch mates. The ops are private, so their presence
and their result are checked once at load, falling back to ``F.linear`` if either fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacked oneDNN linears exist here and agree with ``F.linear``."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        w, x = torch.randn(48, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
        packed = ops._reorder_linear_weight(w, 5)
        got = ops._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(got, F.linear(x, w), rtol=1e-2, atol=1e-2)
    except (RuntimeError, TypeError):
        return False


def padded_rows(rows: int) -> int:
    """A row count the matmuls see again and again: beyond 64 rows, rounded up to one of 32 sizes per
    doubling (at most 1/32 more rows, steps of at least 16). oneDNN builds a primitive for every new input
    shape, and its cache holds 1,024; a first call at a new row count costs about 0.7 ms per weight shape on the
    default model and 10-28 ms over the four of a 156M model (against 0.5-3.5 s for its prefill at 500-4,000
    rows), so rounding saves those calls in a long-running server, while each padded row costs what a prompt
    token does: at 8 sizes per doubling prefill computed 2-4% padding on peers (up to 12.5%, e.g. 4,097 ->
    4,608 rows). Decode batches (up to ``max_num_seqs``) repeat by themselves."""
    if rows <= 64:
        return rows
    step = max(16, (1 << (rows.bit_length() - 1)) // 32)
    return -(-rows // step) * step


class Linear:
    """``y = x @ weight.T + bias`` with the weight packed for the fastest kernel available."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool, batch_hint: int = 64):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.onednn = onednn
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if onednn else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + (0 if self.bias is None else self.bias.nbytes)
