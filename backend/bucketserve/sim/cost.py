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
        """A prefill of prompts of these lengths: packed back to back (our executor), or padded to the longest
        (transformers', which also runs its last layer for every position)."""
        if padded:
            lengths = [max(lengths)] * len(lengths)
        return self.step_s([(n, 0) for n in lengths], len(lengths), [], sampled_last_layer=not padded)

    def decode_s(self, contexts: list[int]) -> float:
        """One decode step of rows with these cached lengths (the new position included)."""
        return self.step_s([], 0, contexts)

    def step_s(self, chunks: list[tuple[int, int]], firsts: int, contexts: list[int],
               sampled_last_layer: bool = True) -> float:
        """One forward of prompt chunks, each (new positions, positions it already has cached), ``firsts`` of
        which complete their prompt (and get a first token), and a decode row per entry of ``contexts`` (its
        cached length, the new position included): our paged executor's step, one pass over the weights. With
        ``sampled_last_layer`` the last layer projects keys and values for every token but runs attention, o and
        the MLP for the sampled rows alone (a prompt's last position, each decode row), as the LM head does."""
        m = self.model
        tokens = sum(n for n, _ in chunks) + len(contexts)
        sampled = firsts + len(contexts)
        layers = m.layers - 1 if sampled_last_layer else m.layers  # that run prefill attention
        causal = sum(n * n + 2 * n * cached for n, cached in chunks)  # QK^T and PV over each new position's keys
        attention = 2 * causal * m.heads * m.head_dim * layers / (self.hw.attention_flops * self.devices)
        kv = sum(contexts) * m.kv_bytes_per_token(self.dtype_bytes) / ((self.hw.kv_bw or self.hw.mem_bw) * self.devices)
        last = m.layer_params - m.qkv_params if sampled_last_layer else 0
        return (self.fixed_s(len(chunks) + len(contexts)) + self.matmul_s(tokens, m.body_params - last)
                + self.matmul_s(sampled, last + m.head_params) + attention + kv + self.elementwise_s(tokens)
                + self.all_reduce_s(tokens))
