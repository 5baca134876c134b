"""``bucketserve simulate calibrate``: a hardware profile of this machine, from the real executor.

Operators first (as Vidur profiles them): the model's own matmuls from one row (the weight read rate) to
many (FLOP/s), and prefill attention over one long prompt. Then whole
prefill and decode steps of the real executor over a grid of shapes; what the operators do not explain
(a fixed cost per forward, a cost per row, the elementwise steps, the decode attention's read of cached keys
and values) is fitted to them by least squares. Last, whole offline runs of the engine give what it adds to
its forward passes, per step and per generated token.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bucketserve.sim.cost import CostModel
from bucketserve.sim.hardware import Hardware
from bucketserve.sim.shape import ModelShape

PREFILL_GRID = ((1, 64), (1, 512), (4, 128), (8, 256), (16, 256), (8, 500), (1, 2000), (2, 1024))
"""(prompts, tokens each) of the timed prefill steps."""
DECODE_GRID = ((1, 64), (8, 128), (32, 256), (64, 128), (64, 512), (128, 300), (32, 1024), (8, 2000))
"""(rows, cached positions each) of the timed decode steps."""


def best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls after one warm-up: the machine's rate, not its neighbours' noise."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: refit without the columns that came out negative."""
    active = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        if active:
            coef[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef
        active = [i for i in active if i not in negative]


def rate(per_unit: float, unlimited: float = 1e15) -> float:
    """A fitted cost per unit (seconds per FLOP, per byte) as a rate; one the fit cannot see (its coefficient
    0) is as good as unlimited."""
    return float(1 / per_unit) if per_unit > 0 else unlimited


MATMUL_ROWS = (1, 8, 32, 64, 128, 256, 512)
"""Row counts the model's matmuls are timed at: from one decode row (the weight read) to a large prefill."""


def _operators(executor: Any, shape: ModelShape, dtype_bytes: int) -> tuple[float, float, float]:
    """(matmul FLOP/s, weight bytes/s, attention FLOP/s) of the model's own layers. A matmul's time here is
    its compute plus its weight read (``Hardware.matmul_overlap`` 0), fitted by relative error to every
    layer's matmuls and the lm_head run one after the other at each of ``MATMUL_ROWS``, as a step runs them:
    one layer's weights alone would stay in cache and read faster than a step's do."""
    import torch

    from bucketserve.executor.attention import PrefillLayout, prefill_attention
    from bucketserve.executor.kv_cache import PagedKVPool

    model = executor.model
    weights = shape.layers * shape.layer_params + shape.head_params
    features, ones = [], []
    with torch.inference_mode():
        big = torch.randn(max(MATMUL_ROWS), shape.hidden, dtype=model.dtype)
        wide = torch.randn(max(MATMUL_ROWS), shape.intermediate, dtype=model.dtype)

        def run(rows: int) -> None:
            for layer in model.layers:
                for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    linear((wide if linear is layer.down else big)[:rows])
            model.lm_head(big[:rows])

        for rows in MATMUL_ROWS:
            seconds = best_of(lambda: run(rows))
            features.append([2 * rows * weights / seconds, weights * dtype_bytes / seconds])
            ones.append(1.0)
        per_flop, per_byte = nonnegative_lstsq(np.array(features), np.array(ones))
        # as a prefill step runs it: the prompt's keys and values in pool pages, on the executor's kernel if it has one
        n = 1024
        q = torch.randn(n, shape.heads, shape.head_dim, dtype=model.dtype)
        kv = torch.randn(n, shape.kv_heads, shape.head_dim, dtype=model.dtype)
        pool = PagedKVPool(1, shape.kv_heads, shape.head_dim, executor.page_size, -(-n // executor.page_size),
                           model.dtype, q.device)
        pool.reserve(0, n)
        pool.write(0, pool.slot_index(*pool.slots(0, 0, n)), kv, kv)
        layout = PrefillLayout.build([pool.tables[0].pages], [n], [0], q.device)
        seconds = best_of(lambda: prefill_attention(q, kv, kv, layout, pool.keys[0], pool.values[0], model.scale,
                                                    executor.kernel))
        attention = 2 * n * n * shape.heads * shape.head_dim / seconds
    return rate(per_flop, unlimited=1e18), rate(per_byte), attention


def _steps(executor: Any, vocab: int) -> tuple[list[tuple[str, list[int]]], list[float]]:
    """Times of whole prefill and decode steps of the real executor over the grids."""
    from bucketserve.engine.executor import StepOutput
    from bucketserve.engine.request import Request, SamplingParams
    from bucketserve.sim.validate import prompt_ids

    def requests(count: int, length: int, out: int) -> list[Request]:
        return [Request("", prompt_ids(i, length, vocab),
                        SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)) for i in range(count)]

    shapes: list[tuple[str, list[int]]] = []
    times: list[float] = []
    for count, length in PREFILL_GRID:
        batch = requests(count, length, 1)

        def prefill() -> None:
            executor.prefill(batch)
            executor.reset()

        shapes.append(("prefill", [length] * count))
        times.append(best_of(prefill))
    def record(out: StepOutput) -> None:
        for request, token in zip(out.rows, out.tokens):  # the engine's part: a decode reads the last token
            request.output_ids.append(token)

    for rows, context in DECODE_GRID:
        executor.reset()
        record(executor.prefill(requests(rows, context, 64)))
        shapes.append(("decode", [context + 1] * rows))
        times.append(best_of(lambda: record(executor.decode())))
        executor.reset()
    return shapes, times


ENGINE_RUNS = ((32, 128), (8, 1))
"""Offline peers runs (requests, max_num_seqs) of the whole engine: one with full batches, one a row at a time,
so the engine's own cost splits into a part per step and a part per generated token."""
ENGINE_REPEATS = 3
"""The fastest of this many runs counts (as for single steps: the machine's rate, not its neighbours' noise)."""


def _engine_overhead(model: Any, hw: Hardware, shape: ModelShape, log: Callable[[str], None]) -> Hardware:
    """Add what the whole engine spends beyond its forward passes (scheduling, each token's bookkeeping,
    events and text, threads that share the cores): the gap between real offline runs and their simulation,
    fitted as a cost per step plus a cost per generated token."""
    from bucketserve.config import EngineConfig
    from bucketserve.sim.runner import simulate
    from bucketserve.sim.validate import run_real
    from bucketserve_client.workload import DEFAULT_CLASSES, generate

    def end(outcomes: list) -> float:
        return max(o.sent + o.e2e for o in outcomes)

    rows, gaps = [], []
    for requests, seqs in ENGINE_RUNS:
        config = EngineConfig(device="cpu", executor="paged", max_num_seqs=seqs)
        specs = [replace(s, deadline=False) for s in generate("peers", requests, shape.max_len, 0, 0.2, DEFAULT_CLASSES)]
        times = [0.0] * len(specs)
        run_real(model, config, specs[:2], times[:2])  # first forwards pay one-off costs
        real = min(end(run_real(model, config, specs, times)[0]) for _ in range(ENGINE_REPEATS))
        sim = simulate(config, CostModel(hw, shape), specs, times)
        rows.append([sim.stats.steps, sim.stats.output_tokens])
        gaps.append(real - end(sim.outcomes))
        log(f"[calibrate] whole engine, {requests} requests, max_num_seqs {seqs}: {real:.2f} s against "
            f"{end(sim.outcomes):.2f} s from the steps alone")
    per_step, per_token = nonnegative_lstsq(np.array(rows, dtype=float), np.array(gaps))
    log(f"[calibrate] the engine adds {per_step * 1e3:.2f} ms per step and {per_token * 1e6:.0f} us per token")
    return replace(hw, step_overhead_s=hw.step_overhead_s + float(per_step),
                   row_overhead_s=hw.row_overhead_s + float(per_token))


def calibrate(model_path: str, name: str, log: Callable[[str], None] = print) -> tuple[Hardware, list[tuple[str, list[int], float, float]]]:
    """The profile, and for each timed step (kind, lengths, measured s, predicted s by the steps' fit, before
    the whole engine's cost per token is added)."""
    from bucketserve.config import EngineConfig
    from bucketserve.engine.memory import available_ram
    from bucketserve.factory import load_model, on_passing_thread

    config = EngineConfig(device="cpu", executor="paged")
    loaded = load_model(config, model_path, log=log)
    executor = loaded.executor
    on_passing_thread(executor.allocate, 1 << 30)
    shape = ModelShape.from_config(Path(model_path))
    dtype = str(executor.model.dtype).removeprefix("torch.")
    dtype_bytes = executor.model.dtype.itemsize
    log("[calibrate] timing the model's matmuls and attention")
    # timed on threads that end, as the engine's own thread runs: see on_passing_thread
    flops, read, attention = on_passing_thread(_operators, executor, shape, dtype_bytes)
    log(f"[calibrate] matmul {flops / 1e9:.0f} GFLOP/s, weights read at {read / 1e9:.1f} GB/s, "
        f"prefill attention {attention / 1e9:.0f} GFLOP/s")
    log(f"[calibrate] timing {len(PREFILL_GRID)} prefill and {len(DECODE_GRID)} decode steps")
    shapes, measured = on_passing_thread(_steps, executor, shape.vocab)
    bare = Hardware(name, flops, read, attention, act_bw=float("inf"),
                    memory_bytes=config.kv_cache_memory_fraction * available_ram(), step_overhead_s=0.0,
                    row_overhead_s=0.0, kv_bw=float("inf"), matmul_overlap=0.0, dtype=dtype, device="cpu",
                    source="")
    cost = CostModel(bare, shape)
    unit = CostModel(replace(bare, act_bw=1.0), shape)
    rows, residual = [], []
    for (kind, lengths), seconds in zip(shapes, measured):
        predicted = cost.prefill_s(lengths) if kind == "prefill" else cost.decode_s(lengths)
        tokens = sum(lengths) if kind == "prefill" else len(lengths)
        kv_read = 0 if kind == "prefill" else sum(lengths) * shape.kv_bytes_per_token(dtype_bytes)
        # divided by the step's time: relative error, so a 200 ms prefill does not set the cost of a 3 ms decode
        rows.append([x / seconds for x in (1.0, len(lengths), unit.elementwise_s(tokens), kv_read)])
        residual.append(1 - predicted / seconds)
    overhead, per_row, per_byte, per_kv_byte = nonnegative_lstsq(np.array(rows), np.array(residual))
    hw = replace(bare, step_overhead_s=float(overhead), row_overhead_s=float(per_row),
                 act_bw=rate(per_byte), kv_bw=rate(per_kv_byte),
                 source=f"calibrated with {model_path} ({shape.layers} layers, hidden {shape.hidden}) on "
                        f"{os.cpu_count()} cores by `bucketserve simulate calibrate`")
    fitted = CostModel(hw, shape)
    report = [(kind, lengths, seconds, fitted.prefill_s(lengths) if kind == "prefill" else fitted.decode_s(lengths))
              for (kind, lengths), seconds in zip(shapes, measured)]
    errors = [abs(p / m - 1) for _, _, m, p in report]
    log(f"[calibrate] per forward {overhead * 1e3:.2f} ms, per row {per_row * 1e6:.1f} us, cached KV read at "
        f"{hw.kv_bw / 1e9:.1f} GB/s; step time error "
        f"median {statistics.median(errors):.1%}, worst {max(errors):.1%}")
    hw = _engine_overhead(loaded, hw, shape, log)
    return hw, report
