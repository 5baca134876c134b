"""Read the server's ``bucketserve_*`` Prometheus series: counters for a run's deltas, and samples of the
buckets, N_max and KV bytes over time."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = ("bucketserve_prefill_positions_total", "bucketserve_prefill_padding_positions_total",
            "bucketserve_decode_positions_total", "bucketserve_decode_padding_positions_total",
            "bucketserve_prefill_batches_total", "bucketserve_output_tokens_total")


def series(text: str, model: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] for every ``bucketserve_`` series of ``model``."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("bucketserve_"):
            continue
        for sample in family.samples:
            if sample.labels.get("model") == model:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in found.get(name, []))


@dataclass(frozen=True)
class Sample:
    """The server's state at one moment of a run (``t`` seconds from its start)."""

    t: float
    buckets: list[tuple[int, int]]
    n_max: int
    kv_bytes: float
    queue: int


def sample(t: float, found: dict[str, list[tuple[dict[str, str], float]]]) -> Sample:
    lows = {labels["bucket"]: v for labels, v in found.get("bucketserve_bucket_lower_bound", [])}
    ups = {labels["bucket"]: v for labels, v in found.get("bucketserve_bucket_upper_bound", [])}
    live = int(value(found, "bucketserve_buckets"))  # series of merged-away buckets linger, zeroed
    buckets = sorted((int(lows[b]), int(ups[b])) for b in lows if b in ups and int(b) < live)
    return Sample(t, buckets, int(value(found, "bucketserve_n_max")), value(found, "bucketserve_kv_cache_bytes"),
                  int(value(found, "bucketserve_queue_depth")))


def run_figures(before: dict, after: dict) -> dict[str, float]:
    """A run's token-weighted padding shares and batch counts, from counter deltas, plus peak KV and budget."""
    d = {name: value(after, name) - value(before, name) for name in COUNTERS}

    def share(part: str, whole: str) -> float:
        return d[part] / d[whole] if d[whole] else 0.0

    return {
        "prefill_padding": share("bucketserve_prefill_padding_positions_total", "bucketserve_prefill_positions_total"),
        "decode_padding": share("bucketserve_decode_padding_positions_total", "bucketserve_decode_positions_total"),
        "prefill_batches": d["bucketserve_prefill_batches_total"],
        "server_output_tokens": d["bucketserve_output_tokens_total"],
        "kv_peak_bytes": value(after, "bucketserve_kv_cache_peak_bytes"),
        "kv_budget_bytes": value(after, "bucketserve_kv_cache_budget_bytes"),
    }
