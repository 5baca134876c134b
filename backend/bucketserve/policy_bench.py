"""`bucketserve bench-policies`: the three scheduling policies on one offline mixed workload, in one
process, on one loaded model, with the Global Monitor's figures side by side.

The workload has the lengths of ``bucketserve-client bench --workload mixed`` (same seed, same
lengths; see ``bucketserve_client.workload``), so the two measure the same work, here without the
server and the network in between. Prompts are windows of real
text (Python's standard library, which the default model's tokenizer was trained on), all
requests arrive at t = 0 as offline requests, decode greedily and ignore EOS, so every policy
generates exactly the same tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bucketserve.config import EngineConfig
from bucketserve_client import workload
from bucketserve.engine import Engine, Event
from bucketserve.model_builder import corpus, default_model_dir
from bucketserve.policy import OFFLINE, POLICIES
from bucketserve.request import Request, SamplingParams
from bucketserve.runner import Runner
from bucketserve.scheduler import build_scheduler


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int


def mixed_workload(runner: Runner, n: int, long_share: float, seed: int, max_len: int) -> list[Job]:
    """The client bench's ``mixed`` lengths (same seed, same lengths), as windows of corpus token ids."""
    rng = random.Random(seed)
    text_ids = runner.tokenize("\n".join(corpus(2_000_000)))
    jobs = []
    for length, out in workload.lengths("mixed", n, max_len, seed, long_share):
        start = rng.randrange(len(text_ids) - length)
        jobs.append(Job(text_ids[start:start + length], out))
    return jobs


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    seconds: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    prefill_batches: int
    mean_prefill_batch: float
    prefill_padding: float
    decode_padding: float
    kv_peak_bytes: int
    kv_budget_bytes: int
    bucketing_share: float
    final_buckets: int


class Done:
    def __init__(self, total: int):
        self.total, self.finished, self.tokens = total, 0, 0
        self.cond = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self.cond:
            for e in events:
                self.tokens += len(e.new_tokens)
                self.finished += e.finish is not None
            self.cond.notify_all()


def run_policy(runner: Runner, config: EngineConfig, jobs: list[Job], max_len: int) -> PolicyResult:
    done = Done(len(jobs))
    runner.max_decode_groups = config.max_decode_groups
    scheduler = build_scheduler(config, runner.kv_cost().bytes_per_token, runner.free_device_memory(
        config.max_prefill_tokens, max_len), max_len)
    engine = Engine(runner, scheduler, done, log=lambda m: print(m, file=sys.stderr))
    requests = [Request("", job.prompt_ids, SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True),
                        priority=OFFLINE) for job in jobs]
    expected = sum(job.max_tokens for job in jobs)
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    engine.start()
    with done.cond:
        while done.finished < len(jobs):
            done.cond.wait_for(lambda: done.finished == len(jobs), timeout=1.0)
            print(f"\r  {config.scheduler_policy:12s} {done.finished:4d}/{len(jobs)} requests "
                  f"{done.tokens:6d}/{expected} tokens {time.perf_counter() - start:6.1f} s", end="", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(file=sys.stderr)
    engine.stop()
    s = engine.stats
    return PolicyResult(config.scheduler_policy, seconds, s.output_tokens, s.output_tokens / seconds, len(jobs) / seconds,
                        s.prefill_batches, len(jobs) / max(1, s.prefill_batches), s.prefill_padding_total,
                        s.decode_padding_total, s.kv_peak_bytes, s.kv_budget_bytes, s.bucketing_share, len(s.buckets))


def table(results: list[PolicyResult]) -> str:
    lines = ["| policy | output tok/s | req/s | prefill batches (mean size) | prefill padding | decode padding "
             "| peak KV / budget | bucketing share |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.policy} | {r.output_tokens_per_s:.0f} | {r.requests_per_s:.2f} | {r.prefill_batches} "
                     f"({r.mean_prefill_batch:.1f}) | {r.prefill_padding:.1%} | {r.decode_padding:.1%} | "
                     f"{r.kv_peak_bytes / 2**20:.0f} / {r.kv_budget_bytes / 2**20:.0f} MiB | {r.bucketing_share:.2%} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", type=Path, default=None, help="Hugging Face causal-LM directory (default model)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated scheduler policies")
    p.add_argument("--requests", type=int, default=96, help="requests in the workload")
    p.add_argument("--long-share", type=float, default=0.2, help="share of long-tail prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-decode-groups", type=int, default=EngineConfig.max_decode_groups,
                   help="1: one padded running set")
    p.add_argument("--kv-cache-bytes", type=int, default=0,
                   help="M_remaining for the KV cache (0: measured as the server does)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config.pbtxt parameter, for every policy (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def main(args: argparse.Namespace) -> int:
    model_path = str(args.model_path or default_model_dir())
    runner = Runner(model_path, args.device, args.dtype, log=lambda m: print(f"[bench-policies] {m}", file=sys.stderr))
    max_len = runner.max_position_embeddings
    jobs = mixed_workload(runner, args.requests, args.long_share, args.seed, max_len)
    lengths = sorted(len(j.prompt_ids) for j in jobs)
    print(f"[bench-policies] {len(jobs)} requests, prompt tokens median {lengths[len(lengths) // 2]}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {lengths[-1]}; output tokens {sum(j.max_tokens for j in jobs)}",
          file=sys.stderr)
    warm = EngineConfig(scheduler_policy="continuous", kv_cache_bytes=args.kv_cache_bytes)
    print("[bench-policies] warm-up", file=sys.stderr)
    run_policy(runner, warm, jobs[:4], max_len)  # first forwards pay one-off costs
    results = []
    for policy in args.policies.split(","):
        params = dict(kv.split("=", 1) for kv in args.param)
        params.update(scheduler_policy=policy, max_num_seqs=str(args.max_num_seqs),
                      max_decode_groups=str(args.max_decode_groups), kv_cache_bytes=str(args.kv_cache_bytes))
        config = EngineConfig.from_parameters(params)
        results.append(run_policy(runner, config, jobs, max_len))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
