"""The discrete-event loop: the engine's own ``EngineCore`` (scheduler, buckets, policy, KV budget, monitor)
stepped in simulated time over a ``SimExecutor``. Arrivals enter when the clock passes their time; a step
takes what the cost model says; an idle engine jumps to the next arrival."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bucketserve.config import EngineConfig
from bucketserve.engine.core import EngineCore
from bucketserve.engine.monitor import Snapshot
from bucketserve.engine.request import FinishReason, Priority, Request, SamplingParams
from bucketserve.engine.scheduler import build_scheduler
from bucketserve.sim.cost import CostModel
from bucketserve.sim.executor import SimClock, SimExecutor
from bucketserve_client.stats import Outcome
from bucketserve_client.workload import RequestSpec

IDLE_TICK_S = 1e-3
"""How far the clock moves when requests wait and the policy holds them back with nothing running (it
waits for a batch to fill or a queue delay to pass): the real engine polls as often."""


@dataclass
class SimRun:
    outcomes: list[Outcome]
    stats: Snapshot
    forward_seconds: float
    """Simulated time spent in forward passes (the rest of the run the engine idled)."""


def activation_reserve(config: EngineConfig, cost: CostModel) -> int:
    """Device bytes a worst-case prefill's activations take, kept out of the KV budget (as the GPU executor
    measures at load): hidden states, the fused gate/up output and the sampled rows' logits."""
    m = cost.model
    return config.max_prefill_tokens * (4 * m.hidden + 2 * m.intermediate) * cost.dtype_bytes + \
        config.max_num_seqs * m.vocab * 4


def _request(spec: RequestSpec, arrival: float) -> Request:
    sampling = SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True)
    slo_ms = max(1, round(spec.cls.ttft_ms)) if spec.deadline else None
    return Request("", [0] * spec.prompt_len, sampling, Priority(spec.cls.priority), slo_ms, arrival_time=arrival)


def outcome(spec: RequestSpec, request: Request, origin: float = 0.0) -> Outcome:
    """A finished request as the bench reports it, with times from ``origin`` (the run's start)."""
    ok = request.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    ttft = None if request.first_token_time is None else request.first_token_time - request.arrival_time
    e2e = None if request.finish_time is None else request.finish_time - request.arrival_time
    return Outcome(spec.cls.name, request.arrival_time - origin, ttft, e2e, request.num_output, spec.cls.ttft_ms / 1000,
                   spec.cls.e2e_ms / 1000, None if ok else (request.finish_reason or FinishReason.ERROR).value)


def figures(stats: Snapshot, busy_seconds: float, end: float) -> dict[str, float]:
    """The figures the bench scrapes from a server's metrics, from an engine's monitor."""
    s = stats
    return {"prefill_padding": s.prefill_padded_tokens / s.prefill_tokens if s.prefill_tokens else 0.0,
            "decode_padding": s.decode_padded_positions / s.decode_positions if s.decode_positions else 0.0,
            "prefill_batches": s.prefill_batches, "server_output_tokens": s.output_tokens,
            "kv_peak_bytes": s.kv_peak_bytes, "kv_budget_bytes": s.kv_budget_bytes,
            "busy_share": busy_seconds / end if end > 0 else 0.0}


def simulate(config: EngineConfig, cost: CostModel, specs: list[RequestSpec], times: list[float],
             on_finish: Callable[[int], None] = lambda _n: None) -> SimRun:
    """Run ``specs[i]`` arriving at ``times[i]`` (non-decreasing seconds) to the end; ``on_finish`` gets the
    number of requests that ended in each step (for a progress bar)."""
    clock = SimClock()
    executor = SimExecutor(cost, clock, config.kv_page_size if config.executor != "hf" else 0,
                           activation_reserve(config, cost))
    max_len = config.max_model_len or cost.model.max_len
    free = executor.free_device_memory(config.max_prefill_tokens, max_len)
    scheduler = build_scheduler(config, executor.kv_cost().bytes_per_token, free, max_len, executor.page_size)
    executor.allocate(scheduler.budget.budget_bytes)
    ended = 0

    def emit(events: list) -> None:
        nonlocal ended
        ended += sum(1 for e in events if e.finish is not None)

    core = EngineCore(executor, scheduler, emit, log=lambda _m: None, slo_expiry=config.slo_expiry, clock=clock)
    requests = [_request(spec, t) for spec, t in zip(specs, times)]
    arrived = 0
    while arrived < len(requests) or core.has_work():
        while arrived < len(requests) and requests[arrived].arrival_time <= clock.now:
            core.add(requests[arrived])
            arrived += 1
        if not core.has_work():
            clock.now = requests[arrived].arrival_time
            continue
        before, ended = clock.now, 0
        core.step()
        on_finish(ended)
        if clock.now == before:  # nothing ran: the policy is holding its batch back
            next_arrival = requests[arrived].arrival_time if arrived < len(requests) else clock.now + IDLE_TICK_S
            clock.now = min(next_arrival, clock.now + IDLE_TICK_S)
    return SimRun([outcome(s, r) for s, r in zip(specs, requests)], core.monitor.snapshot(), executor.forward_seconds)
