"""Hardware profiles: the rates a step's cost model divides by, and the fixed costs it adds.

GPU profiles come from public datasheet peaks times efficiencies fitted to Vidur's published operator times
(``sim/vidur.py``), and say so in ``source``;
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
    layer_overhead_s: float = 0.0
    """Fixed time per decoder layer per forward pass: the start and tail of small kernels, which a roofline misses
    (GPUs; on the CPU the calibrated per-step cost holds it)."""
    kv_bw: float = 0.0
    """Bytes/s a decode step's attention reads cached keys and values at; 0: ``mem_bw`` (a GPU streams both
    alike; a CPU kernel does arithmetic on each position and reads them slower)."""
    matmul_overlap: float = 1.0
    """Share of the shorter of a matmul's compute and weight read that the longer hides: 1 on GPUs (the
    roofline), 0 as calibrated on the CPU, where the two add up (one decoder layer of the default model at 64
    rows: 0.77 ms measured, 0.59 ms by the roofline, 0.71 ms as their sum)."""
    link_bw: float = 0.0
    """Bytes/s between devices (one direction), for tensor parallelism and KV transfer; 0: one device only."""
    link_latency_s: float = 0.0
    dtype: str = "bfloat16"
    """The dtype these rates hold for (weights and KV)."""
    device: str = "cuda"
    """The kind of device profiled, ``cpu`` or ``cuda``: the engine's defaults that depend on it
    (``max_prefill_tokens``) take its value, as on a real one."""
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


@dataclass(frozen=True)
class Efficiency:
    """What a GPU reaches of its datasheet, fitted to Vidur's operator profiles by ``bucketserve simulate fit``
    (see ``sim/vidur.py``)."""
    matmul: float
    memory: float
    elementwise: float
    layer_overhead_s: float
    fitted_to: str


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's datasheet figures, and the efficiencies fitted for its family."""
    peak_flops: float
    """Dense bf16 FLOP/s."""
    hbm_bw: float
    memory_bytes: float
    link_bw: float
    """NVLink bytes/s per direction."""
    datasheet: str
    efficiency: Efficiency


ATTENTION_EFFICIENCY = 0.5
"""Assumed: FlashAttention-2 reports 50-73% of the A100's peak in its forward pass (Vidur's attention profiles
are not in its public snapshot)."""
STEP_OVERHEAD_S, ROW_OVERHEAD_S = 2e-3, 10e-6
"""Assumed: the engine's own time per step and per row on the host (scheduling, sampling, outputs)."""

VIDUR = "Vidur's profiles (github.com/microsoft/vidur @ 7d47513, MIT), data/profiling/compute"
# bucketserve simulate fit --hardware a100-80gb --vidur .../a100/meta-llama/{Llama-2-7b-hf,Llama-2-70b-hf,Meta-Llama-3-8B}/mlp.csv
A100_FIT = Efficiency(0.705, 0.77, 0.43, 63e-6, f"{VIDUR}/a100 (A100 80GB), Llama-2-7B, Llama-2-70B, Llama-3-8B")
# bucketserve simulate fit --hardware h100-80gb --vidur .../h100/meta-llama/{Llama-2-7b-hf,Llama-2-70b-hf}/mlp.csv
H100_FIT = Efficiency(0.69, 0.885, 0.51, 60.5e-6, f"{VIDUR}/h100, Llama-2-7B, Llama-2-70B")
SPECS = {
    "a100-40gb": GpuSpec(312e12, 1555 * GB, 40 * GB, 300 * GB, "NVIDIA A100 datasheet (SXM4 40GB)", A100_FIT),
    "a100-80gb": GpuSpec(312e12, 2039 * GB, 80 * GB, 300 * GB, "NVIDIA A100 datasheet (SXM4 80GB)", A100_FIT),
    "h100-80gb": GpuSpec(989e12, 3350 * GB, 80 * GB, 450 * GB, "NVIDIA H100 datasheet (SXM5)", H100_FIT),
}


def _gpu(name: str) -> Hardware:
    spec, eff = SPECS[name], SPECS[name].efficiency
    return Hardware(name, spec.peak_flops * eff.matmul, spec.hbm_bw * eff.memory, spec.peak_flops * ATTENTION_EFFICIENCY,
                    spec.hbm_bw * eff.elementwise, spec.memory_bytes, step_overhead_s=STEP_OVERHEAD_S,
                    row_overhead_s=ROW_OVERHEAD_S, layer_overhead_s=eff.layer_overhead_s, link_bw=spec.link_bw,
                    link_latency_s=10e-6, dtype="bfloat16",
                    source=f"{spec.datasheet}: dense bf16 peak {spec.peak_flops / 1e12:g} TFLOP/s, HBM "
                           f"{spec.hbm_bw / GB:,.0f} GB/s, NVLink {spec.link_bw / GB:g} GB/s per direction; matmul "
                           f"{eff.matmul}, memory {eff.memory}, elementwise {eff.elementwise} of those and "
                           f"{eff.layer_overhead_s * 1e6:g} us per layer, fitted to {eff.fitted_to}; attention "
                           f"{ATTENTION_EFFICIENCY} of peak, {STEP_OVERHEAD_S * 1e3:g} ms per step and "
                           f"{ROW_OVERHEAD_S * 1e6:g} us per row (assumed)")


PRESETS = {name: _gpu(name) for name in SPECS}

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
