"""Reading the server's metrics text: live buckets only, and a run's padding from counter deltas."""

from __future__ import annotations

import pytest

from bucketserve_client import scrape

TEXT = """# HELP bucketserve_buckets Length buckets
bucketserve_buckets{model="bucketserve"} 2
bucketserve_buckets{model="other"} 1
bucketserve_n_max{model="bucketserve"} 12
bucketserve_kv_cache_bytes{model="bucketserve"} 4096
bucketserve_queue_depth{model="bucketserve",priority="0"} 3
bucketserve_queue_depth{model="bucketserve",priority="1"} 4
bucketserve_bucket_lower_bound{bucket="0",model="bucketserve"} 0
bucketserve_bucket_upper_bound{bucket="0",model="bucketserve"} 1024
bucketserve_bucket_lower_bound{bucket="1",model="bucketserve"} 1024
bucketserve_bucket_upper_bound{bucket="1",model="bucketserve"} 2048
bucketserve_bucket_lower_bound{bucket="2",model="bucketserve"} 0
bucketserve_bucket_upper_bound{bucket="2",model="bucketserve"} 0
bucketserve_bucket_upper_bound{bucket="0",model="other"} 2048
nv_inference_count{model="bucketserve",version="1"} 9
"""


def test_sample_reads_live_buckets_of_one_model():
    s = scrape.sample(1.5, scrape.series(TEXT, "bucketserve"))
    assert s == scrape.Sample(1.5, [(0, 1024), (1024, 2048)], 12, 4096.0, 7)  # bucket 2 merged away


def counters(prefill: float, prefill_pad: float, decode: float, decode_pad: float, batches: float) -> str:
    return "\n".join([
        f'bucketserve_prefill_positions_total{{model="m"}} {prefill}',
        f'bucketserve_prefill_padding_positions_total{{model="m"}} {prefill_pad}',
        f'bucketserve_decode_positions_total{{model="m"}} {decode}',
        f'bucketserve_decode_padding_positions_total{{model="m"}} {decode_pad}',
        f'bucketserve_prefill_batches_total{{model="m"}} {batches}',
        'bucketserve_output_tokens_total{model="m"} 0',
        'bucketserve_kv_cache_peak_bytes{model="m"} 100',
        'bucketserve_kv_cache_budget_bytes{model="m"} 900'])


def test_run_figures_are_shares_of_counter_increases():
    before = scrape.series(counters(1000, 900, 5000, 100, 3), "m")  # earlier runs: mostly padding
    after = scrape.series(counters(1400, 1000, 6000, 350, 7), "m")
    f = scrape.run_figures(before, after)
    assert f["prefill_padding"] == pytest.approx(100 / 400) and f["decode_padding"] == pytest.approx(250 / 1000)
    assert f["prefill_batches"] == 4 and f["kv_peak_bytes"] == 100 and f["kv_budget_bytes"] == 900
    assert scrape.run_figures(before, before)["prefill_padding"] == 0.0
