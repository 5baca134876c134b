"""Hardware profiles: the rates a step's cost model divides by, and the fixed costs it adds.

GPU profiles come from public datasheet peaks times an efficiency we assume (and say so in ``source``);
a CPU profile comes from ``bucketserve simulate calibrate``, which times the real executor on this machine.
Rates are what a step achieves, not peaks: ``matmul_flops`` is dense matmul FLOP/s at large batch,
``mem_bw`` the bytes/s a memory-bound matmul or the decode attention reads weights and KV at.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    matmul_flops: float
    """Dense matmul FLOP/s achieved at large row counts (compute-bound)."""
    mem_bw: float
    """Bytes/s achieved reading weights (memory-bound matmuls) and cached keys and values."""
    attention_flops: float
    """FLOP/s of prefill attention (causal, per sequence)."""
    act_bw: float
    """Bytes/s of the elementwise steps (norms, activation, RoPE, residual adds) over activations."""
    memory_bytes: float
    """Device memory per device (a CPU profile: the RAM the engine's KV budget starts from)."""
    step_overhead_s: float
    """Fixed cost of an engine step: scheduling, input preparation, launches."""
    row_overhead_s: float
    """Cost per sequence in a step: its bookkeeping, sampling and output."""
    kv_bw: float = 0.0
    """Bytes/s a decode step's attention reads cached keys and values at; 0: ``mem_bw`` (a GPU streams both
    alike; a CPU kernel does arithmetic on each position and reads them slower)."""
    link_bw: float = 0.0
    """Bytes/s between devices (one direction), for tensor parallelism and KV transfer; 0: one device only."""
    link_latency_s: float = 0.0
    dtype: str = "bfloat16"
    """The dtype these rates hold for (weights and KV)."""
    source: str = ""

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Hardware":
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown hardware fields {sorted(unknown)}")
        return cls(**data)


MATMUL_EFFICIENCY, ATTENTION_EFFICIENCY, MEMORY_EFFICIENCY, ACT_EFFICIENCY = 0.7, 0.5, 0.8, 0.5
"""Our assumptions for GPUs: cuBLAS reaches 60-80% of the dense peak on LLM-sized GEMMs; FlashAttention-2
reports 50-73% of the A100's peak in its forward pass; HBM streams at ~80-90% of its datasheet bandwidth;
unfused elementwise kernels do worse."""


def _gpu(name: str, peak_flops: float, hbm: float, memory: float, link: float, where: str) -> Hardware:
    return Hardware(name, peak_flops * MATMUL_EFFICIENCY, hbm * MEMORY_EFFICIENCY, peak_flops * ATTENTION_EFFICIENCY,
                    hbm * ACT_EFFICIENCY, memory, step_overhead_s=2e-3, row_overhead_s=10e-6,
                    link_bw=link, link_latency_s=10e-6, dtype="bfloat16",
                    source=f"{where}: dense bf16 peak {peak_flops / 1e12:g} TFLOP/s, HBM {hbm / GB:,.0f} GB/s, "
                           f"NVLink {link / GB:g} GB/s per direction; efficiencies matmul {MATMUL_EFFICIENCY}, "
                           f"attention {ATTENTION_EFFICIENCY}, memory {MEMORY_EFFICIENCY} (assumed); overheads "
                           "2 ms per step and 10 us per row (assumed)")


PRESETS = {
    "a100-40gb": _gpu("a100-40gb", 312e12, 1555 * GB, 40 * GB, 300 * GB, "NVIDIA A100 datasheet (SXM4 40GB)"),
    "a100-80gb": _gpu("a100-80gb", 312e12, 2039 * GB, 80 * GB, 300 * GB, "NVIDIA A100 datasheet (SXM4 80GB)"),
    "h100-80gb": _gpu("h100-80gb", 989e12, 3350 * GB, 80 * GB, 450 * GB, "NVIDIA H100 datasheet (SXM5)"),
}

CPU_PROFILE = Path(__file__).with_name("profiles") / "cpu.json"
"""The calibrated profile of the machines this project is developed and tested on (2 cores, AVX-512)."""


def hardware(name: str) -> Hardware:
    """A preset's name, ``cpu`` (the shipped calibrated profile), or a profile JSON path."""
    if name in PRESETS:
        return PRESETS[name]
    path = CPU_PROFILE if name == "cpu" else Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"--hardware {name!r} is neither a preset ({', '.join([*PRESETS, 'cpu'])}) nor a profile file")
    return Hardware.load(path)
