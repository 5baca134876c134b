"""The Global Monitor on Triton's metrics port: Prometheus families prefixed ``bucketserve_``.

``update`` runs on the response thread (a side thread, never the engine's), every ``metrics_interval_ms``:
it copies the monitor's snapshot into the gauges that changed, advances counters by what changed, and
feeds the latency observations made since the last call into histograms.
"""

from __future__ import annotations

from typing import Any, Callable

import triton_python_backend_utils as pb_utils

from bucketserve.engine.monitor import Monitor, Snapshot
from bucketserve.engine.request import Priority

def kv_usage(s: Snapshot) -> float:
    return min(1.0, s.kv_bytes / s.kv_budget_bytes) if s.kv_budget_bytes else 0.0


GAUGES: dict[str, tuple[str, Callable[[Snapshot], float]]] = {
    # the three an inference gateway's endpoint picker routes on (vLLM's num_requests_waiting,
    # num_requests_running and kv_cache_usage_perc, with their semantics)
    "bucketserve_num_requests_waiting": ("Requests waiting for prefill, every priority class", lambda s: sum(s.waiting)),
    "bucketserve_requests_running": ("Sequences in the running (decode) set", lambda s: s.running),
    "bucketserve_kv_cache_usage_perc": ("Share of the KV budget the running set holds, 0 to 1", kv_usage),
    "bucketserve_buckets": ("Length buckets the waiting requests are sorted into", lambda s: len(s.buckets)),
    "bucketserve_n_max": ("Largest batch of longest-length sequences the KV budget holds", lambda s: s.n_max),
    "bucketserve_kv_cache_bytes": ("Bytes held by the running set's KV cache, padding included", lambda s: s.kv_bytes),
    "bucketserve_kv_cache_peak_bytes": ("Most bytes the KV cache has held", lambda s: s.kv_peak_bytes),
    "bucketserve_kv_cache_reserved_bytes": ("KV bytes the running set has reserved (prompt + max_tokens, padded)",
                                            lambda s: s.kv_reserved_bytes),
    "bucketserve_kv_cache_budget_bytes": ("KV budget M_safe admission keeps the running set under",
                                          lambda s: s.kv_budget_bytes),
    "bucketserve_prefill_batch_size": ("Requests in the last prefill batch", lambda s: s.last_batch_size),
    "bucketserve_prefill_padding_ratio": ("Padding share of the last prefill batch", lambda s: s.prefill_padding),
    "bucketserve_prefill_packed": ("1 when prefill runs packed (paged executor), 0 when padded (hf executor)",
                                   lambda s: s.prefill_packed),
    "bucketserve_decode_padding_ratio": ("Padding share of the KV the last decode step read", lambda s: s.decode_padding),
    "bucketserve_arrival_rate": ("Requests per second arriving, over the last 10 s", lambda s: s.arrival_rate),
    "bucketserve_bucketing_time_share": ("Share of engine step time spent choosing batches (bucketing included)",
                                         lambda s: s.bucketing_share),
}
COUNTERS: dict[str, tuple[str, Callable[[Snapshot], float]]] = {
    "bucketserve_slo_met_total": ("Requests with slo_ms whose first token came in time", lambda s: s.slo_met),
    "bucketserve_slo_missed_total": ("Requests with slo_ms whose first token came late (or never)",
                                     lambda s: s.slo_missed),
    "bucketserve_requests_expired_total": ("Requests ended because their deadline (timeout or slo_ms) could "
                                           "no longer be met", lambda s: s.expired),
    "bucketserve_requests_failed_total": ("Requests ended by an error in the engine or the model",
                                          lambda s: s.failed),
    "bucketserve_oom_retries_total": ("Forward passes that ran out of memory and were retried in halves",
                                      lambda s: s.oom_retries),
    "bucketserve_prefill_batches_total": ("Prefill batches run", lambda s: s.prefill_batches),
    "bucketserve_output_tokens_total": ("Tokens generated", lambda s: s.output_tokens),
    "bucketserve_prefill_positions_total": ("Prompt positions prefill batches computed, padding included",
                                            lambda s: s.prefill_tokens),
    "bucketserve_prefill_padding_positions_total": ("Padding positions among them", lambda s: s.prefill_padded_tokens),
    "bucketserve_decode_positions_total": ("KV positions decode steps attended to, padding included",
                                           lambda s: s.decode_positions),
    "bucketserve_decode_padding_positions_total": ("Padding positions among them",
                                                   lambda s: s.decode_padded_positions),
}
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
HISTOGRAMS: dict[str, tuple[str, str, list[float]]] = {
    "ttft": ("bucketserve_time_to_first_token_seconds", "Arrival to first token", LATENCY_S),
    "tpot": ("bucketserve_time_per_output_token_seconds", "Mean time between output tokens of a request", LATENCY_S),
    "e2e": ("bucketserve_e2e_request_latency_seconds", "Arrival to final token", LATENCY_S),
    "batch_size": ("bucketserve_prefill_batch_requests", "Requests per prefill batch",
                   [1, 2, 4, 8, 16, 32, 64, 128, 256]),
}
BUCKET_GAUGES: dict[str, tuple[str, Callable[[Any], float]]] = {
    "bucketserve_bucket_lower_bound": ("Lowest prompt length of a bucket (inclusive)", lambda b: b.low),
    "bucketserve_bucket_upper_bound": ("Prompt length a bucket ends before (exclusive)", lambda b: b.up),
    "bucketserve_bucket_requests": ("Requests waiting in a bucket", lambda b: b.requests),
    "bucketserve_bucket_n_max": ("Largest batch the KV budget allows from a bucket", lambda b: b.n_max),
}


class EngineMetrics:
    def __init__(self, model: str, info: dict[str, str], parameters: int):
        """``info``: what the model runs on (executor, dtype, checkpoint), as the labels of
        ``bucketserve_model_info``, whose value is the checkpoint's parameter count."""
        self.labels = {"model": model}
        gauge, counter, histogram = (pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER,
                                     pb_utils.MetricFamily.HISTOGRAM)
        # Triton requires each family to outlive its metrics, so families are kept too
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=gauge)
                          for name, (text, _) in {**GAUGES, **BUCKET_GAUGES}.items()}
        self._families["bucketserve_queue_depth"] = pb_utils.MetricFamily(
            name="bucketserve_queue_depth", description="Requests waiting for prefill, per priority class", kind=gauge)
        self._families.update({name: pb_utils.MetricFamily(name=name, description=text, kind=counter)
                               for name, (text, _) in COUNTERS.items()})
        self._families.update({name: pb_utils.MetricFamily(name=name, description=text, kind=histogram)
                               for name, text, _ in HISTOGRAMS.values()})
        self._gauges = {name: self._families[name].Metric(labels=self.labels) for name in GAUGES}
        self._queue = [self._families["bucketserve_queue_depth"].Metric(labels={**self.labels, "priority": str(int(p))})
                       for p in Priority]
        self._counters = {name: self._families[name].Metric(labels=self.labels) for name in COUNTERS}
        self._counted = dict.fromkeys(COUNTERS, 0.0)
        self._histograms = {key: self._families[name].Metric(labels=self.labels, buckets=bounds)
                            for key, (name, _, bounds) in HISTOGRAMS.items()}
        self._families["bucketserve_model_info"] = pb_utils.MetricFamily(
            name="bucketserve_model_info", kind=gauge,
            description="Parameters of the loaded checkpoint; labels: executor, dtype, checkpoint path")
        self._info = self._families["bucketserve_model_info"].Metric(labels={**self.labels, **info})
        self._info.set(float(parameters))
        self._buckets: list[dict[str, Any]] = []
        self._last: dict[int, float] = {}
        """What each gauge was last set to, by the metric's id: each set is an IPC call, so unchanged ones are skipped."""

    def _set(self, metric: Any, value: float) -> None:
        if self._last.get(id(metric)) != value:
            metric.set(value)
            self._last[id(metric)] = value

    def update(self, monitor: Monitor) -> None:
        snap = monitor.snapshot()
        for name, (_, read) in GAUGES.items():
            self._set(self._gauges[name], float(read(snap)))
        for metric, depth in zip(self._queue, snap.waiting):
            self._set(metric, float(depth))
        for name, (_, read) in COUNTERS.items():
            value = float(read(snap))
            if value > self._counted[name]:
                self._counters[name].increment(value - self._counted[name])
                self._counted[name] = value
        for observation in monitor.drain():
            self._histograms[observation.metric].observe(observation.value)
        self._update_buckets(snap)

    def _update_buckets(self, snap: Snapshot) -> None:
        """One series per bucket index. Triton keeps a series once created, so the series of buckets that
        merged away stay, zeroed (``[0, 0)``, no requests): only indices below ``bucketserve_buckets`` are live."""
        while len(self._buckets) < len(snap.buckets):
            labels = {**self.labels, "bucket": str(len(self._buckets))}
            self._buckets.append({name: self._families[name].Metric(labels=labels) for name in BUCKET_GAUGES})
        for i, metrics in enumerate(self._buckets):
            for name, (_, read) in BUCKET_GAUGES.items():
                self._set(metrics[name], float(read(snap.buckets[i])) if i < len(snap.buckets) else 0.0)
