"""GPU efficiencies fitted to Vidur's published operator profiles (``bucketserve simulate fit``).

Vidur (Agrawal et al., MLSys 2024; github.com/microsoft/vidur, MIT license) times every operator of a
decoder layer on real A100 and H100 GPUs, for token counts from 1 to 4,096 and tensor parallelism 1 to
8, and ships the times as ``data/profiling/compute/<gpu>/<model>/mlp.csv`` (milliseconds). Our cost model
prices a matmul as the longer of its compute (FLOPs / (peak x matmul efficiency)) and its weight read
(bytes / (HBM bandwidth x memory efficiency)), and the elementwise steps as traffic over HBM x their
efficiency. This fits those three efficiencies to Vidur's times, and reports how far the fitted model
lands from each measured operator, so a GPU profile says how it was derived and how wrong it is.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MATMULS = {"attn_pre_proj": "qkv", "attn_post_proj": "o", "mlp_up_proj": "gate_up", "mlp_down_proj": "down"}
"""Vidur's column -> our name, for the four matmuls of a layer."""
ELEMENTWISE = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")
"""The elementwise operators of a layer (``add``, the residual add, runs twice)."""


@dataclass(frozen=True)
class Row:
    """One timed configuration: per-device shapes (weights already divided by tensor parallelism)."""
    tokens: int
    tp: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    times_s: dict[str, float]
    """Median time of each operator, in seconds."""

    def weights(self) -> dict[str, int]:
        """Weights of each matmul on one device (Vidur's tensor-parallel shards)."""
        head_dim = self.hidden // self.heads
        return {"qkv": self.hidden * (self.heads + 2 * self.kv_heads) * head_dim // self.tp,
                "o": self.heads * head_dim * self.hidden // self.tp,
                "gate_up": 2 * self.hidden * self.intermediate // self.tp,
                "down": self.intermediate * self.hidden // self.tp}

    def elementwise_s(self) -> float:
        return sum(self.times_s[op] for op in ELEMENTWISE) + self.times_s["add"]


def read(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            times = {MATMULS.get(op, op): float(r[f"time_stats.{op}.median"]) / 1e3 for op in [*MATMULS, *ELEMENTWISE]}
            rows.append(Row(int(r["num_tokens"]), int(r["num_tensor_parallel_workers"]), int(r["n_embd"]),
                            int(r["n_expanded_embd"]), int(r["n_head"]), int(r["n_kv_head"]), times))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class Fit:
    matmul: float
    """Share of the dense peak a compute-bound matmul reaches."""
    memory: float
    """Share of the HBM bandwidth a memory-bound matmul reads its weights at."""
    elementwise: float
    """Share of the HBM bandwidth the elementwise steps move their activations at (at many tokens)."""
    matmul_latency_s: float
    """What each matmul takes on top of its roofline time: a small kernel's start and tail."""
    elementwise_floor_s: float
    """Per layer, the elementwise steps' time at one token: their kernels' floor, which traffic does not see."""
    errors: dict[str, tuple[float, float]]
    """Per operator: (median, 90th percentile) of |predicted / measured - 1| over the rows."""

    @property
    def layer_overhead_s(self) -> float:
        """Fixed time per layer per forward pass: four matmuls' latency and the elementwise floor."""
        return 4 * self.matmul_latency_s + self.elementwise_floor_s


def matmul_s(tokens: np.ndarray, weights: np.ndarray, peak: float, hbm: float, compute: float, memory: float,
             latency: float, dtype_bytes: int) -> np.ndarray:
    return np.maximum(2 * tokens * weights / (peak * compute), weights * dtype_bytes / (hbm * memory)) + latency


def elementwise_bytes(row: Row, dtype_bytes: int) -> float:
    """What ``CostModel.elementwise_s`` charges one layer on one device: 8 x hidden + 3 x intermediate values
    per token."""
    return row.tokens * (8 * row.hidden + 3 * row.intermediate) * dtype_bytes


def _search(loss: Callable[[float, float, float], float]) -> tuple[float, float, float]:
    """The (compute, memory, latency) of least loss: a coarse grid, then a finer one around its best point."""
    best = min((loss(c, m, l), c, m, l) for c in np.arange(0.2, 1.001, 0.05) for m in np.arange(0.2, 1.001, 0.05)
               for l in np.arange(0.0, 30e-6, 2e-6))
    _, c0, m0, l0 = best
    best = min((loss(c, m, l), c, m, l) for c in np.arange(c0 - 0.05, c0 + 0.051, 0.005)
               for m in np.arange(m0 - 0.05, m0 + 0.051, 0.005) for l in np.arange(max(0.0, l0 - 2e-6), l0 + 2.1e-6, 0.5e-6)
               if 0 < c <= 1 and 0 < m <= 1)
    return float(best[1]), float(best[2]), float(best[3])


def fit(rows: list[Row], peak_flops: float, hbm_bw: float, dtype_bytes: int = 2) -> Fit:
    """Efficiencies and latency minimizing the mean |log(predicted / measured)| over every matmul of every row;
    the elementwise floor from unsplit rows (one device) of one token, and the efficiency of the traffic on top
    of it from those of 512 tokens or more."""
    tokens = np.array([r.tokens for r in rows for _ in MATMULS], dtype=float)
    weights = np.array([r.weights()[op] for r in rows for op in MATMULS.values()], dtype=float)
    measured = np.array([r.times_s[op] for r in rows for op in MATMULS.values()])

    def loss(compute: float, memory: float, latency: float) -> float:
        predicted = matmul_s(tokens, weights, peak_flops, hbm_bw, compute, memory, latency, dtype_bytes)
        return float(np.abs(np.log(predicted / measured)).mean())

    compute, memory, latency = _search(loss)
    one = [r for r in rows if r.tp == 1]
    floor = float(np.median([r.elementwise_s() for r in one if r.tokens == 1] or [0.0]))
    big = [r for r in one if r.tokens >= 512]
    elementwise = float(np.exp(np.mean(np.log([elementwise_bytes(r, dtype_bytes) / hbm_bw / (r.elementwise_s() - floor)
                                                for r in big]))))
    rel = np.abs(matmul_s(tokens, weights, peak_flops, hbm_bw, compute, memory, latency, dtype_bytes) / measured - 1)
    names = np.array([op for _ in rows for op in MATMULS.values()])
    errors = {op: (float(np.median(rel[names == op])), float(np.percentile(rel[names == op], 90)))
              for op in MATMULS.values()}
    rel = np.array([abs((elementwise_bytes(r, dtype_bytes) / (hbm_bw * elementwise) + floor) / r.elementwise_s() - 1)
                    for r in one])
    errors["elementwise"] = (float(np.median(rel)), float(np.percentile(rel, 90)))
    return Fit(compute, memory, elementwise, latency, floor, errors)
