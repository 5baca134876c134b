"""Output tokens/s at fixed concurrencies, on the workload our peers were measured on.

The default workload is shared/PEERS.md's: 64 prompts of 19 to 506 tokens under the model's
tokenizer, exactly 64 greedy output tokens each (EOS ignored). Each concurrency level runs the
whole set with that many requests in flight; concurrency equal to the prompt count is "all
submitted at once". Reported figures are the median of ``--repeats`` timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bucketserve_client.client import BucketServeClient

FILLER = ("the model serves requests in batches of similar length so that padding stays low and the "
          "memory of the cache is used for real tokens rather than for waste").split()


def prompt_of_length(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Real words whose tokenization (with BOS) is exactly ``n_tokens`` long, or as close as it gets."""
    words: list[str] = []
    while len(tokenizer(" ".join(words)).input_ids) < n_tokens:
        words.append(rng.choice(FILLER))
    text = " ".join(words)
    ids = tokenizer(text).input_ids
    if len(ids) > n_tokens:  # trim whole tokens off the end
        text = tokenizer.decode(ids[1:n_tokens], skip_special_tokens=True)
    return text


def make_prompts(tokenizer, count: int, low: int, high: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [prompt_of_length(tokenizer, rng.randint(low, high), rng) for _ in range(count)]


@dataclass(frozen=True)
class RunResult:
    requests: int
    output_tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def run_once(client: BucketServeClient, prompts: list[str], concurrency: int, output_tokens: int,
             progress: str) -> RunResult:
    done = 0
    lock = threading.Lock()

    def one(prompt: str) -> tuple[int, float]:
        nonlocal done
        start = time.perf_counter()
        c = client.generate(prompt, max_tokens=output_tokens, temperature=0, ignore_eos=True)
        latency = time.perf_counter() - start
        with lock:
            done += 1
            print(f"\r{progress}: {done}/{len(prompts)} requests", end="", file=sys.stderr, flush=True)
        return c.num_output_tokens or 0, latency

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    print(file=sys.stderr)
    return RunResult(len(prompts), sum(n for n, _ in results), seconds, [lat for _, lat in results])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8001")
    p.add_argument("--model", default="bucketserve")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="model directory whose tokenizer sizes the prompts (default: the default model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-prompt-tokens", type=int, default=19)
    p.add_argument("--max-prompt-tokens", type=int, default=506)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,32,64", help="comma-separated levels")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per level; the median is reported")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from bucketserve.model_builder import default_model_dir

        args.tokenizer = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = make_prompts(tokenizer, args.num_prompts, args.min_prompt_tokens, args.max_prompt_tokens, args.seed)
    total = sum(len(tokenizer(p).input_ids) for p in prompts)
    print(f"workload: {len(prompts)} prompts, {total} prompt tokens (mean {total / len(prompts):.0f}), "
          f"{args.output_tokens} output tokens each", flush=True)
    client = BucketServeClient(args.url, args.model)
    run_once(client, prompts[:4], 4, 8, "warm-up")
    print(f"{'concurrency':>11} {'output tok/s':>12} {'req/s':>7} {'p50 latency s':>13} {'runs (tok/s)':>24}")
    for level in (int(c) for c in args.concurrency.split(",")):
        runs = [run_once(client, prompts, level, args.output_tokens, f"concurrency {level}, run {i + 1}")
                for i in range(args.repeats)]
        median = sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]
        print(f"{level:>11} {median.tokens_per_s:>12.0f} {median.requests / median.seconds:>7.2f} "
              f"{statistics.median(median.latencies):>13.2f} {', '.join(f'{r.tokens_per_s:.0f}' for r in runs):>24}",
              flush=True)
    return 0
