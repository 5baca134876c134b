"""Engine state as Prometheus gauges on Triton's metrics port (names prefixed bucketserve_)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from bucketserve.engine import EngineStats

GAUGES = {
    "waiting": "bucketserve_requests_waiting",
    "running": "bucketserve_requests_running",
    "kv_bytes": "bucketserve_kv_cache_bytes",
}
HELP = {
    "waiting": "Requests queued for prefill",
    "running": "Sequences in the running (decode) set",
    "kv_bytes": "Bytes held by the running set's KV cache, padding included",
}


class EngineMetrics:
    def __init__(self, model: str):
        # Triton requires each family to outlive its metrics, so both are kept
        self._families = {
            field: pb_utils.MetricFamily(name=name, description=HELP[field], kind=pb_utils.MetricFamily.GAUGE)
            for field, name in GAUGES.items()
        }
        self._gauges = {field: family.Metric(labels={"model": model}) for field, family in self._families.items()}

    def update(self, stats: EngineStats) -> None:
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(stats, field)))
