"""The Global Monitor's arithmetic: padding ratios, peaks, SLO accounting, drained observations."""

from __future__ import annotations

from bucketserve.engine.monitor import Monitor
from bucketserve.engine.request import FinishReason, Request, SamplingParams


def finished(ttft_s: float | None, outputs: int, slo_ms: int | None, reason=FinishReason.LENGTH) -> Request:
    r = Request("p", [1, 2], SamplingParams(), slo_ms=slo_ms, arrival_time=100.0)
    r.output_ids = [7] * outputs
    r.first_token_time = None if ttft_s is None else 100.0 + ttft_s
    r.finish(reason)
    r.finish_time = 100.0 + (ttft_s or 0) + 0.1 * max(0, outputs - 1)
    return r


def test_padding_ratios_are_token_weighted():
    m = Monitor(kv_budget_bytes=1000)
    m.on_prefill([10, 10, 20], 60, packed=False)  # 60 padded slots, 40 real
    m.on_prefill([5], 5, packed=False)
    m.on_decode(positions=100, padded=25)
    m.on_decode(positions=300, padded=0)
    s = m.snapshot()
    assert s.prefill_padding == 0.0 and s.last_batch_size == 1
    assert s.prefill_padding_total == 20 / 65
    assert s.decode_padding == 0.0 and s.decode_padding_total == 25 / 400
    m.on_kv(700)
    m.on_step(0.5, 0.001, (2, 1), 3, 300, 900, (), 4)
    s = m.snapshot()
    assert (s.kv_peak_bytes, s.kv_bytes, s.kv_budget_bytes, s.waiting) == (700, 300, 1000, (2, 1))
    assert s.bucketing_share == 0.002


def test_slo_met_missed_and_latency_observations():
    m = Monitor()
    m.on_finish(finished(0.05, 11, slo_ms=100))
    m.on_finish(finished(0.5, 1, slo_ms=100))
    m.on_finish(finished(None, 0, slo_ms=100, reason=FinishReason.ERROR))  # failed before a token: missed
    m.on_finish(finished(None, 0, slo_ms=100, reason=FinishReason.CANCELLED))  # the client left: neither
    m.on_finish(finished(0.2, 3, slo_ms=None))
    s = m.snapshot()
    assert (s.slo_met, s.slo_missed, s.output_tokens) == (1, 2, 15)
    seen = {(o.metric, round(o.value, 6)) for o in m.drain()}
    assert ("ttft", 0.05) in seen and ("tpot", 0.1) in seen and ("e2e", 1.05) in seen
    assert m.drain() == []
