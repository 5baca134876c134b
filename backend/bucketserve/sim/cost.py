"""How long one forward pass takes: a roofline over the model's shape and a hardware profile.

Each matmul takes the longer of its compute (2 x rows x weights / FLOP/s) and its weight read (bytes /
bandwidth), so decode at small batch is memory-bound and prefill compute-bound, as measured on real
devices (on the CPU the two add up instead: ``Hardware.matmul_overlap``); a fixed time per layer adds what
small kernels take to start and drain. Attention is causal FLOPs for a prefill and the cached keys and values
read for a decode row (padding included, if the executor pads). With ``devices`` > 1 the model is split
tensor-parallel: rates multiply, and each layer adds two all-reduces of the activations over the link.
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.sim.hardware import Hardware
from bucketserve.sim.shape import ModelShape


@dataclass(frozen=True)
class CostModel:
    hw: Hardware
    model: ModelShape
    devices: int = 1

    @property
    def dtype_bytes(self) -> int:
        return self.hw.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.model.num_parameters * self.dtype_bytes

    def matmul_s(self, rows: int, params: int) -> float:
        if rows == 0:
            return 0.0
        n = self.devices
        compute = 2 * rows * params / (self.hw.matmul_flops * n)
        read = params * self.dtype_bytes / (self.hw.mem_bw * n)
        return compute + read - self.hw.matmul_overlap * min(compute, read)

    def fixed_s(self, rows: int) -> float:
        """What a forward pass costs whatever its size: per step, per row, and per layer (each device runs every
        layer on its shard, so tensor parallelism does not divide it)."""
        return self.hw.step_overhead_s + self.hw.row_overhead_s * rows + self.model.layers * self.hw.layer_overhead_s

    def elementwise_s(self, tokens: int) -> float:
        """Norms, RoPE, residual adds and the gated activation: a few reads and writes of each layer's
        activations per token (8 x hidden + 3 x intermediate values)."""
        m = self.model
        return tokens * m.layers * (8 * m.hidden + 3 * m.intermediate) * self.dtype_bytes / (self.hw.act_bw * self.devices)

    def all_reduce_s(self, tokens: int) -> float:
        if self.devices == 1:
            return 0.0
        n, m = self.devices, self.model
        ring = 2 * (n - 1) / n * tokens * m.hidden * self.dtype_bytes / self.hw.link_bw
        return 2 * m.layers * (self.hw.link_latency_s + ring)

    def prefill_s(self, lengths: list[int], padded: bool = False) -> float:
        """A prefill of prompts of these lengths: packed back to back, or padded to the longest."""
        m = self.model
        if padded:
            lengths = [max(lengths)] * len(lengths)
        tokens = sum(lengths)
        causal = sum(n * n for n in lengths)  # QK^T and PV over half of an n x n square each
        attention = 2 * causal * m.heads * m.head_dim * m.layers / (self.hw.attention_flops * self.devices)
        return (self.fixed_s(len(lengths)) + self.matmul_s(tokens, m.body_params)
                + self.matmul_s(len(lengths), m.head_params) + attention + self.elementwise_s(tokens)
                + self.all_reduce_s(tokens))

    def decode_s(self, contexts: list[int]) -> float:
        """One decode step of rows with these cached lengths (the new position included)."""
        m = self.model
        rows = len(contexts)
        kv = sum(contexts) * m.kv_bytes_per_token(self.dtype_bytes) / ((self.hw.kv_bw or self.hw.mem_bw) * self.devices)
        return (self.fixed_s(rows) + self.matmul_s(rows, m.body_params)
                + self.matmul_s(rows, m.head_params) + kv + self.elementwise_s(rows) + self.all_reduce_s(rows))
