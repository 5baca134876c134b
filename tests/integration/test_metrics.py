"""The Global Monitor on Triton's metrics port: after a mixed run, the bucketserve_ metrics say
what happened (queues, buckets, N_max, padding, KV bytes against the budget, latencies, SLOs)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from bucketserve.config import EngineConfig
from bucketserve_client import BucketServeClient
from bucketserve_client.client import BucketServeError
from tests.waiting import wait_for


def test_metrics_describe_a_mixed_run(server):
    counters = ("bucketserve_time_to_first_token_seconds_count", "bucketserve_slo_met_total",
                "bucketserve_slo_missed_total", "bucketserve_output_tokens_total", "bucketserve_prefill_batches_total",
                "bucketserve_requests_expired_total")

    def settled() -> dict[str, float]:
        """Counters once they stop moving: earlier tests' last requests are counted by then."""
        return server.settled(counters)

    before = settled()
    client = BucketServeClient(server.grpc_url)
    jobs = [("word " * (3 + 40 * (i % 4)), {"max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                           "priority": i % 2, "slo_ms": 60_000 if i % 3 else None})
            for i in range(12)]
    jobs.append(("late", {"max_tokens": 2, "temperature": 0, "ignore_eos": True, "slo_ms": 1}))

    def run(job):
        try:
            return client.generate(job[0], **{k: v for k, v in job[1].items() if v is not None})
        except BucketServeError as e:
            return e

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert [r.num_output_tokens for r in results[:12]] == [6] * 12
    assert "deadline exceeded: no first token" in str(results[12])  # 1 ms cannot be met: it ends at once
    # counted on the metrics port's next refresh; then nothing more may come
    wait_for(lambda: server.metric("bucketserve_output_tokens_total") - before["bucketserve_output_tokens_total"] >= 6 * 12
             and server.metric("bucketserve_requests_expired_total") > before["bucketserve_requests_expired_total"],
             timeout=30, what="the run's tokens and expiry counted")
    after = settled()
    delta = {name: after[name] - before[name] for name in counters}
    assert delta["bucketserve_time_to_first_token_seconds_count"] == 12
    assert delta["bucketserve_output_tokens_total"] == 6 * 12
    assert delta["bucketserve_slo_met_total"] == 8  # i % 3 != 0
    assert delta["bucketserve_slo_missed_total"] == 1
    assert delta["bucketserve_requests_expired_total"] == 1
    assert 1 <= delta["bucketserve_prefill_batches_total"] <= 13
    assert server.metric("bucketserve_prefill_batch_requests_count") >= 1
    assert server.metric("bucketserve_queue_depth", priority="0") == 0
    assert server.metric("bucketserve_queue_depth", priority="1") == 0
    assert server.metric("bucketserve_arrival_rate") > 0

    buckets = int(server.metric("bucketserve_buckets"))
    assert buckets >= 1
    assert server.metric("bucketserve_bucket_lower_bound", bucket="0") == 0
    assert server.metric("bucketserve_bucket_upper_bound", bucket=str(buckets - 1)) == 2048  # max_model_len
    assert server.metric("bucketserve_bucket_n_max", bucket="0") >= 1
    assert 1 <= server.metric("bucketserve_n_max") <= EngineConfig().max_num_seqs

    budget = server.metric("bucketserve_kv_cache_budget_bytes")
    assert 0 < server.metric("bucketserve_kv_cache_peak_bytes") <= budget
    assert 0 <= server.metric("bucketserve_prefill_padding_ratio") < 1
    assert 0 <= server.metric("bucketserve_decode_padding_ratio") < 1
    assert 0 < server.metric("bucketserve_bucketing_time_share") < 0.5
    # the baselines report too, each for its own model
    assert server.metric("bucketserve_kv_cache_budget_bytes", model="bucketserve_fcfs_static") > 0


def test_the_model_runs_under_tcmalloc_where_the_machine_has_it(server):
    """`bucketserve serve` preloads it; tritonserver's Python stub inherits it and says so in its info labels."""
    from bucketserve.launcher.allocator import find_tcmalloc

    library = find_tcmalloc()
    expected = os.path.basename(os.path.realpath(library)) if library else "glibc"
    assert server.metric("bucketserve_model_info", malloc=expected) > 0
