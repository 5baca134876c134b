"""Benchmark workloads: length distributions match their targets, seeds reproduce, traces parse."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from bucketserve_client import workload
from bucketserve_client.defaults import corpus_text
from bucketserve_client.workload import DEFAULT_CLASSES, PriorityClass, PromptMaker

N = 4000
TOLERANCE = 0.05  # relative, for medians and means of N draws (their sampling error is ~1-2%)
MAX_LEN = 2048


def close(value: float, target: float, tolerance: float = TOLERANCE) -> bool:
    return abs(value - target) <= tolerance * target


def test_alpaca_matches_the_papers_median_and_mean():
    pairs = workload.lengths("alpaca", N, MAX_LEN, seed=1)
    prompts = [p for p, _ in pairs]
    assert close(statistics.median(prompts), 69) and close(statistics.mean(prompts), 83.7)
    outputs = [o for _, o in pairs]
    assert close(statistics.median(outputs), workload.ALPACA_OUTPUT[0])
    assert close(statistics.mean(outputs), workload.ALPACA_OUTPUT[1])


def test_longbench_is_scaled_to_the_context_and_truncated_to_fit():
    pairs = workload.lengths("longbench", N, MAX_LEN, seed=2)
    prompts = [p for p, _ in pairs]
    assert close(statistics.median(prompts), workload.LONG_MEDIAN_SHARE * MAX_LEN)
    assert all(p + o < MAX_LEN for p, o in pairs)
    # LongBench's long tail reaches past the context: those prompts are cut at the limit (10-20% of them)
    truncated = sum(p + o == MAX_LEN - 1 for p, o in pairs) / N
    assert 0.08 < truncated < 0.2
    assert max(prompts) / statistics.median(prompts) > 2  # long-tailed, not a narrow band


def test_mixed_draws_the_long_share_from_longbench():
    only_short = workload.lengths("mixed", N, MAX_LEN, seed=3, long_share=0.0)
    only_long = workload.lengths("mixed", N, MAX_LEN, seed=3, long_share=1.0)
    assert close(statistics.median([p for p, _ in only_short]), 69)
    assert close(statistics.median([p for p, _ in only_long]), workload.LONG_MEDIAN_SHARE * MAX_LEN)
    mixed = workload.lengths("mixed", N, MAX_LEN, seed=3, long_share=0.2)
    # Alpaca prompts above 400 tokens are rarer than 1 in 1,000; LongBench's are above it ~80% of the time
    assert 0.2 * 0.7 < sum(p > 400 for p, _ in mixed) / N < 0.2 * 0.9


def test_peers_workload_is_shared_peers_md():
    pairs = workload.lengths("peers", 64, MAX_LEN, seed=0)
    assert all(19 <= p <= 506 and o == 64 for p, o in pairs)


@pytest.mark.parametrize("name", ["alpaca", "longbench", "mixed", "peers"])
def test_same_seed_same_workload_other_seed_other_workload(name):
    assert workload.generate(name, 50, MAX_LEN, seed=7) == workload.generate(name, 50, MAX_LEN, seed=7)
    assert workload.generate(name, 50, MAX_LEN, seed=7) != workload.generate(name, 50, MAX_LEN, seed=8)


def test_classes_follow_their_shares_and_leave_lengths_alone():
    classes = (PriorityClass("online", 0.25, 1000, 5000, 0), PriorityClass("offline", 0.75, 9000, 90000, 1))
    specs = workload.generate("alpaca", N, MAX_LEN, seed=4, classes=classes)
    assert close(sum(s.cls.name == "online" for s in specs) / N, 0.25, 0.1)
    default = workload.generate("alpaca", N, MAX_LEN, seed=4)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(s.prompt_len, s.output_len) for s in default]


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown workload 'sharegpt'"):
        workload.lengths("sharegpt", 1, MAX_LEN, 0)


def test_class_parsing():
    assert PriorityClass.parse("offline-batch:0.3:5000:60000") == PriorityClass("offline-batch", 0.3, 5000, 60000, 1)
    assert PriorityClass.parse("chat:1:500:8000").priority == 0
    for bad in ("chat:1:500", "chat:x:500:800", "chat:1:0:800"):
        with pytest.raises(ValueError):
            PriorityClass.parse(bad)


def test_workload_file_rows_and_their_errors(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"prompt_len": 100, "output_len": 8},
        {"prompt": "hello there", "output_len": 4, "priority": "offline"},
        {"prompt_len": 50, "output_len": 2, "priority": 1, "slo_ms": 750},
    ]) + "\n\n")
    specs = workload.load_file(trace)
    assert [(s.prompt_len, s.output_len, s.cls.name, s.prompt) for s in specs] == [
        (100, 8, "online", None), (0, 4, "offline", "hello there"), (50, 2, "offline", None)]
    assert specs[2].cls.ttft_ms == 750 and specs[1].cls.ttft_ms == DEFAULT_CLASSES[1].ttft_ms
    for row, message in [
        ('{"prompt_len": 5}', "output_len must be a positive integer"),
        ('{"prompt_len": 5, "prompt": "x", "output_len": 1}', "give exactly one of prompt and prompt_len"),
        ('{"prompt_len": 5, "output_len": 1, "temperature": 0}', "unknown keys \\['temperature'\\]"),
        ('{"prompt_len": 5, "output_len": 1, "priority": "gold"}', "priority 'gold' is none of"),
        ("{not json", "not JSON"),
    ]:
        trace.write_text(json.dumps({"prompt_len": 3, "output_len": 1}) + "\n" + row + "\n")
        with pytest.raises(ValueError, match=f"trace.jsonl:2: {message}"):
            workload.load_file(trace)


def test_prompts_are_real_text_of_the_requested_length(tokenizer):
    maker = PromptMaker(tokenizer, corpus_text(300_000))
    rng = random.Random(0)
    targets = [rng.randint(2, 1800) for _ in range(60)]
    counts = [maker.count(maker.make(n, rng)) for n in targets]
    # decoding a window of tokens and tokenizing it again can merge a token at an edge: off by one at most
    assert all(abs(c - n) <= 1 for c, n in zip(counts, targets)), list(zip(counts, targets))
    assert sum(c == n for c, n in zip(counts, targets)) >= 0.9 * len(targets)


def test_materialize_keeps_given_prompts_and_measures_them(tokenizer):
    maker = PromptMaker(tokenizer, corpus_text(200_000))
    specs = workload.generate("alpaca", 5, MAX_LEN, seed=5)
    given = workload.RequestSpec(0, 3, DEFAULT_CLASSES[0], "import os")
    made = workload.materialize([*specs, given], maker, seed=5)
    assert made[-1].prompt == "import os" and made[-1].prompt_len == maker.count("import os")
    assert all(m.prompt and m.prompt_len == s.prompt_len for m, s in zip(made, specs))
    assert made == workload.materialize([*specs, given], maker, seed=5)
