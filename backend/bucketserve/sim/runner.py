"""The discrete-event loop: the engine's own ``EngineCore`` (scheduler, buckets, policy, KV budget, monitor)
stepped in simulated time over a ``SimExecutor``. Arrivals enter when the clock passes their time; a step
takes what the cost model says; an idle engine jumps to the next arrival."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable

from bucketserve.config import EngineConfig
from bucketserve.engine.core import EngineCore
from bucketserve.engine.monitor import Snapshot
from bucketserve.engine.request import FinishReason, Priority, Request, SamplingParams
from bucketserve.engine.scheduler import build_scheduler
from bucketserve.sim.cost import CostModel
from bucketserve.sim.executor import DecodeOnlyExecutor, PrefillOnlyExecutor, SimClock, SimExecutor
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
    """Simulated time spent in forward passes, per replica (the rest of the run it idled)."""


def activation_reserve(config: EngineConfig, cost: CostModel) -> int:
    """Device bytes a worst-case prefill's activations take, kept out of the KV budget (as the GPU executor
    measures at load): hidden states, the fused gate/up output and the sampled rows' logits."""
    m = cost.model
    return config.max_prefill_tokens * (4 * m.hidden + 2 * m.intermediate) * cost.dtype_bytes + \
        config.max_num_seqs * m.vocab * 4


def _request(spec: RequestSpec, arrival: float) -> Request:
    sampling = SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True)
    return Request("", [0] * spec.prompt_len, sampling, Priority(spec.cls.priority), spec.slo_ms, arrival_time=arrival)


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


class Replica:
    """One engine (executor, scheduler, monitor) with its own clock."""

    def __init__(self, config: EngineConfig, cost: CostModel, on_finish: Callable[[int], None],
                 kind: type[SimExecutor] = SimExecutor, after_step: Callable[["Replica"], None] = lambda _r: None):
        config = config.on_device(cost.hw.device)
        self.clock = SimClock()
        self.executor = kind(cost, self.clock, config.kv_page_size if config.executor != "hf" else 0,
                             activation_reserve(config, cost))
        self.after_step = after_step
        max_len = config.max_model_len or cost.model.max_len
        free = self.executor.free_device_memory(config.max_prefill_tokens, max_len)
        scheduler = build_scheduler(config, self.executor.kv_cost().bytes_per_token, free, max_len,
                                    self.executor.page_size, self.executor.unified_step)
        self.executor.allocate(scheduler.budget.budget_bytes)
        self.core = EngineCore(self.executor, scheduler, self._emit, log=lambda _m: None,
                               slo_expiry=config.slo_expiry, clock=self.clock)
        self.on_finish = on_finish

    def _emit(self, events: list) -> None:
        ended = sum(1 for e in events if e.finish is not None)
        if ended:
            self.on_finish(ended)

    def load(self) -> int:
        """Requests it holds, waiting or running (what a least-loaded router compares)."""
        s = self.core.scheduler
        return len(s.waiting) + len(s.running)

    def run_until(self, t: float) -> None:
        """Step until the clock reaches ``t`` (a step that starts before ``t`` ends when it ends); idle, wait."""
        while self.clock.now < t:
            if not self.core.has_work():
                self.clock.now = t
                return
            before = self.clock.now
            self.core.step()
            self.after_step(self)
            if self.clock.now == before:  # nothing ran: the policy is holding its batch back
                self.clock.now = min(t, before + IDLE_TICK_S)

    def drain(self) -> None:
        while self.core.has_work():
            self.run_until(self.clock.now + IDLE_TICK_S)


Router = Callable[[list[Replica], Request], int]


def round_robin() -> Router:
    count = itertools.count()
    return lambda replicas, _request: next(count) % len(replicas)


def least_loaded() -> Router:
    return lambda replicas, _request: min(range(len(replicas)), key=lambda i: replicas[i].load())


def by_length(window: int = 1000, imbalance: float = 2.0) -> Router:
    """Length-aware: replica i takes the i-th quantile range of prompt lengths (estimated from the last
    ``window`` requests), so each engine batches similar lengths; a replica holding more than ``imbalance``
    times the least loaded one's requests (plus one) is passed over for the least loaded."""
    seen: list[int] = []

    def route(replicas: list[Replica], request: Request) -> int:
        seen.append(request.prompt_len)
        del seen[:-window]
        rank = sum(1 for n in seen if n < request.prompt_len) / len(seen)
        choice = min(int(rank * len(replicas)), len(replicas) - 1)
        lightest = min(range(len(replicas)), key=lambda i: replicas[i].load())
        if replicas[choice].load() > imbalance * replicas[lightest].load() + 1:
            return lightest
        return choice
    return route


ROUTERS: dict[str, Callable[[], Router]] = {"round_robin": round_robin, "least_loaded": least_loaded,
                                            "length": by_length}


def _combined(snaps: list[Snapshot]) -> Snapshot:
    """The replicas' monitors as one: counters and budgets summed."""
    summed = ("prefill_tokens", "prefill_padded_tokens", "decode_positions", "decode_padded_positions", "steps",
              "prefill_batches", "output_tokens", "kv_peak_bytes", "kv_budget_bytes", "expired", "failed")
    return replace(snaps[0], **{f: sum(getattr(s, f) for s in snaps) for f in summed})


def simulate(config: EngineConfig, cost: CostModel, specs: list[RequestSpec], times: list[float],
             on_finish: Callable[[int], None] = lambda _n: None, replicas: int = 1,
             router: str = "round_robin") -> SimRun:
    """Run ``specs[i]`` arriving at ``times[i]`` (non-decreasing seconds) to the end, on ``replicas`` engines
    behind ``router``; ``on_finish`` gets the number of requests that end as they end (for a progress bar)."""
    engines = [Replica(config, cost, on_finish) for _ in range(replicas)]
    route = ROUTERS[router]()
    requests = [_request(spec, t) for spec, t in zip(specs, times)]
    for request in requests:
        for engine in engines:
            engine.run_until(request.arrival_time)
        engines[route(engines, request)].core.add(request)
    for engine in engines:
        engine.drain()
    stats = _combined([e.core.monitor.snapshot() for e in engines])
    return SimRun([outcome(s, r) for s, r in zip(specs, requests)], stats,
                  sum(e.executor.forward_seconds for e in engines) / replicas)


def kv_transfer_s(cost: CostModel, tokens: int) -> float:
    """Moving a prompt's KV from the prefill devices to the decode devices: each of ``devices`` sends its shard
    over its own link."""
    hw = cost.hw
    return hw.link_latency_s + tokens * cost.model.kv_bytes_per_token(cost.dtype_bytes) / (hw.link_bw * cost.devices)


def simulate_split(config: EngineConfig, cost: CostModel, specs: list[RequestSpec], times: list[float],
                   on_finish: Callable[[int], None] = lambda _n: None) -> SimRun:
    """Prefill and decode on separate devices (DistServe's layout, and the paper's): the prefill engine runs
    ``config``'s policy over prompts only; each request then moves its KV over the link and joins the decode
    engine, which runs continuous batching. The decode side cannot hold the prefill side back (no
    backpressure), so the prefill side runs first and its hand-offs are the decode side's arrivals."""
    handoffs: list[tuple[float, int, Request]] = []

    def hand_off(replica: Replica) -> None:
        scheduler = replica.core.scheduler
        moved = list(scheduler.running)
        scheduler.running.clear()
        replica.executor.drop({r.id for r in moved})
        now = replica.clock.now
        for request in moved:  # the decode side's executor holds none of it until the request joins there
            request.prefilled = 0
        handoffs.extend((now + kv_transfer_s(cost, r.prompt_len), r.id, r) for r in moved)

    prefill = Replica(config, cost, on_finish, PrefillOnlyExecutor, hand_off)
    requests = [_request(spec, t) for spec, t in zip(specs, times)]
    for request in requests:
        prefill.run_until(request.arrival_time)
        prefill.core.add(request)
    prefill.drain()
    decode = Replica(replace(config, scheduler_policy="continuous"), cost, on_finish, DecodeOnlyExecutor)
    for ready, _, request in sorted(handoffs, key=lambda h: (h[0], h[1])):
        decode.run_until(ready)
        decode.core.add(request)
    decode.drain()
    p, d = prefill.core.monitor.snapshot(), decode.core.monitor.snapshot()
    stats = replace(d, prefill_tokens=p.prefill_tokens, prefill_padded_tokens=p.prefill_padded_tokens,
                    prefill_batches=p.prefill_batches, output_tokens=p.output_tokens + d.output_tokens,
                    kv_budget_bytes=p.kv_budget_bytes + d.kv_budget_bytes, expired=p.expired + d.expired,
                    kv_peak_bytes=p.kv_peak_bytes + d.kv_peak_bytes)
    return SimRun([outcome(s, r) for s, r in zip(specs, requests)], stats,
                  (prefill.executor.forward_seconds + decode.executor.forward_seconds) / 2)
