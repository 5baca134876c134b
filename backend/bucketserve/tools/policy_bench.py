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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from bucketserve.config import EngineConfig
from bucketserve.engine.outputs import RequestOutput
from bucketserve.engine.policy import POLICIES
from bucketserve.engine.request import Priority, SamplingParams
from bucketserve.factory import LoadedModel, build_engine, load_model
from bucketserve_client import provenance, workload
from bucketserve_client.defaults import corpus, default_model_dir


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int


def mixed_workload(model: LoadedModel, n: int, long_share: float, seed: int, max_len: int) -> list[Job]:
    """The client bench's ``mixed`` lengths (same seed, same lengths), as windows of corpus token ids."""
    rng = random.Random(seed)
    text_ids = model.tokenizer.encode("\n".join(corpus(2_000_000)))
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
    """Counts finished requests and generated tokens as the engine's outputs arrive."""

    def __init__(self, bar: tqdm):
        self.bar, self.finished, self.tokens = bar, 0, 0
        self.cond = threading.Condition()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        with self.cond:
            for o in outputs:
                self.tokens += len(o.token_ids)
                self.finished += o.finished
            self.bar.n = self.finished
            self.bar.set_postfix(tokens=self.tokens, refresh=False)
            self.bar.refresh()
            self.cond.notify_all()


def run_policy(model: LoadedModel, config: EngineConfig, jobs: list[Job]) -> PolicyResult:
    quiet = lambda m: None  # noqa: E731
    with tqdm(total=len(jobs), desc=f"  {config.scheduler_policy:12s}", unit="req", file=sys.stderr) as bar:
        done = Done(bar)
        engine = build_engine(config, model, done, log=quiet, log_error=lambda m: print(m, file=sys.stderr))
        sampling = [SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True) for job in jobs]
        requests = [engine.make_request("", s, Priority.OFFLINE, prompt_ids=job.prompt_ids) for job, s in zip(jobs, sampling)]
        start = time.perf_counter()
        for request in requests:
            engine.submit(request)
        engine.start()
        with done.cond:
            done.cond.wait_for(lambda: done.finished == len(jobs))
        seconds = time.perf_counter() - start
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
    params = dict(kv.split("=", 1) for kv in args.param)
    params.update(max_num_seqs=str(args.max_num_seqs), max_decode_groups=str(args.max_decode_groups),
                  kv_cache_bytes=str(args.kv_cache_bytes), device=args.device, dtype=args.dtype)
    base = EngineConfig.from_parameters(params)
    model = load_model(base, str(args.model_path or default_model_dir()),
                       log=lambda m: print(f"[bench-policies] {m}", file=sys.stderr))
    max_len = base.max_model_len or model.executor.max_position_embeddings
    jobs = mixed_workload(model, args.requests, args.long_share, args.seed, max_len)
    lengths = sorted(len(j.prompt_ids) for j in jobs)
    print(f"[bench-policies] {len(jobs)} requests, prompt tokens median {lengths[len(lengths) // 2]}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {lengths[-1]}; output tokens {sum(j.max_tokens for j in jobs)}",
          file=sys.stderr)
    print("[bench-policies] warm-up", file=sys.stderr)
    run_policy(model, replace(base, scheduler_policy="continuous"), jobs[:4])  # first forwards pay one-off costs
    results = [run_policy(model, replace(base, scheduler_policy=policy), jobs) for policy in args.policies.split(",")]
    environment = {**provenance.machine(), "model": {"path": model.path, "parameters": model.executor.num_parameters,
                                                     **model.info()},
                   "engine": {k: v for k, v in asdict(base).items() if k != "scheduler_policy"}}
    print(provenance.markdown({k: v for k, v in environment.items() if k != "engine"}))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "workload": {
            "name": "mixed", "requests": len(jobs), "long_share": args.long_share, "seed": args.seed},
            "results": [asdict(r) for r in results]}, indent=2))
    return 0
