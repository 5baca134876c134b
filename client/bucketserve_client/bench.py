"""`bucketserve-client bench`: the paper's evaluation against one or more targets, side by side.

Every target gets the identical seeded workload: first offline (all requests at t = 0, for output
tokens/s), then one open-loop run per offered rate (Poisson or gamma arrivals, for SLO attainment);
the capacity is the highest rate with at least 80% of requests within their class's SLOs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bucketserve_client import loadgen, provenance, report
from bucketserve_client.arrivals import arrival_times
from bucketserve_client.defaults import corpus_text, default_model_dir
from bucketserve_client.stats import CAPACITY_ATTAINMENT, capacity, summarize
from bucketserve_client.targets import Target, parse_target
from bucketserve_client.workload import (DEFAULT_CLASSES, WORKLOADS, PriorityClass, PromptMaker, RequestSpec,
                                         generate, load_file, materialize)

WARMUP_OUTPUT = 4
MIN_SWEEP_REQUESTS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="triton://localhost:8001/bucketserve",
                   help="comma-separated: triton://HOST:PORT/MODEL[?metrics=PORT] (metrics port default 8002) "
                        "or openai://HOST:PORT/v1[?model=NAME]")
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    p.add_argument("--workload-file", type=Path, default=None,
                   help='JSONL trace, one {"prompt" | "prompt_len", "output_len", "priority", "slo_ms"} per line')
    p.add_argument("--num-requests", type=int, default=96, help="requests in the generated workload")
    p.add_argument("--long-share", type=float, default=0.2, help="LongBench share of the mixed workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="model directory whose tokenizer sizes the prompts (default: the default model)")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="context the prompts are scaled to (default: the model's max_position_embeddings)")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME:SHARE:TTFT_MS:E2E_MS",
                   help="a priority class and its SLOs (repeatable; a name starting with 'offline' is the "
                        "server's offline class). Default: online:0.5:1000:10000 and offline:0.5:10000:60000")
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline run")
    p.add_argument("--rates", default="", help="comma-separated offered rates (req/s) for the SLO sweep")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="arrival process of the sweep")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma inter-arrival gaps")
    p.add_argument("--sweep-seconds", type=float, default=30.0,
                   help="seconds of arrivals per sweep rate: rate x this many requests (the workload's first)")
    p.add_argument("--full-sweep", action="store_true",
                   help="run every rate (default: a target's sweep stops at its first rate below 80%% attainment)")
    p.add_argument("--warmup", type=int, default=4, help="short requests sent to each target before measuring")
    p.add_argument("--out", type=Path, default=None, help="write results.json, report.md and PNG plots here")


def _model_len(tokenizer_dir: Path) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(tokenizer_dir), "max_position_embeddings", 2048))


def describe(name: str, specs: list[RequestSpec], classes: tuple[PriorityClass, ...]) -> str:
    prompts = sorted(s.prompt_len for s in specs)
    outputs = [s.output_len for s in specs]
    shares = ", ".join(f"{c.name} {sum(s.cls.name == c.name for s in specs)}" for c in classes)
    return (f"{name}, {len(specs)} requests; prompt tokens median {statistics.median(prompts):.0f}, mean "
            f"{statistics.mean(prompts):.1f}, max {prompts[-1]}; output tokens mean {statistics.mean(outputs):.1f}, "
            f"{sum(outputs)} in all; classes: {shares}")


def classes_text(classes: tuple[PriorityClass, ...]) -> str:
    return "; ".join(f"{c.name} {c.share:g} (TTFT <= {c.ttft_ms:g} ms, e2e <= {c.e2e_ms:g} ms)" for c in classes)


def run_json(record: loadgen.RunRecord, offered: float | None) -> dict[str, Any]:
    return {"summary": asdict(summarize(record.outcomes, offered)), "server": record.server,
            "samples": [asdict(s) for s in record.samples],
            "outcomes": [{"cls": o.cls, "sent": o.sent, "ttft": o.ttft, "e2e": o.e2e,
                          "output_tokens": o.output_tokens, "error": o.error} for o in record.outcomes]}


def _check_tokens(label: str, record: loadgen.RunRecord, specs: list[RequestSpec]) -> None:
    """Every target must generate exactly the requested tokens, or tokens/s compares unlike work."""
    errors = [o.error for o in record.outcomes if o.error]
    if errors:
        print(f"[bench] WARNING {label}: {len(errors)} requests failed, first: {errors[0]}", file=sys.stderr)
    short = sum(1 for o, s in zip(record.outcomes, specs) if o.ok and o.output_tokens != s.output_len)
    if short:
        print(f"[bench] WARNING {label}: {short} requests did not return exactly max_tokens tokens "
              f"(does the target honour ignore_eos?)", file=sys.stderr)


def sweep_size(rate: float, seconds: float) -> int:
    return max(MIN_SWEEP_REQUESTS, round(rate * seconds))


def sweep_specs(specs: list[RequestSpec], rate: float, seconds: float) -> list[RequestSpec]:
    """The workload's first ``rate x seconds`` requests (at least MIN_SWEEP_REQUESTS), cycling a short trace."""
    return [specs[i % len(specs)] for i in range(sweep_size(rate, seconds))]


async def bench_target(target: Target, specs: list[RequestSpec], pool: list[RequestSpec], args: argparse.Namespace,
                       rates: list[float]) -> dict[str, Any]:
    """``specs`` run offline; the sweep draws from ``pool`` (which starts with them)."""
    # a cold server's first forwards pay one-off costs: no deadline, or a slow model's warm-up expires
    warm = [replace(s, output_len=WARMUP_OUTPUT, deadline=False) for s in specs[:args.warmup]]
    if warm:
        record = await loadgen.run(target, warm, [0.0] * len(warm), f"{target.label} warm-up")
        errors = sorted({o.error or "no final response" for o in record.outcomes if not o.ok})
        if errors:
            print(f"[bench] {target.label}: warm-up requests failed: {'; '.join(errors)}", file=sys.stderr)
    result: dict[str, Any] = {"offline": None, "sweep": []}
    if args.offline:
        # throughput: every request runs to its end, so none carries a deadline the server would enforce
        batch = [replace(s, deadline=False) for s in specs]
        record = await loadgen.run(target, batch, arrival_times("offline", len(batch)), f"{target.label} offline")
        _check_tokens(target.label, record, batch)
        result["offline"] = run_json(record, None)
    for rate in rates:
        sweep = sweep_specs(pool, rate, args.sweep_seconds)
        # one seed for every rate: the same arrival pattern, compressed in time as the rate grows
        times = arrival_times(args.arrival, len(sweep), rate, args.seed, args.cv)
        record = await loadgen.run(target, sweep, times, f"{target.label} {rate:g} req/s")
        _check_tokens(target.label, record, sweep)
        result["sweep"].append({"rate": rate, **run_json(record, rate)})
        if result["sweep"][-1]["summary"]["slo_attainment"] < CAPACITY_ATTAINMENT and not args.full_sweep:
            break  # the crossing is found; higher rates only queue longer
    await target.close()
    return conclude(result, rates)


def conclude(result: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    """Add a target's headline figures to its runs: offline output tokens/s and capacity at 80% SLO."""
    cap = capacity([(p["rate"], p["summary"]["slo_attainment"]) for p in result["sweep"]])
    result["output_tokens_per_s"] = result["offline"]["summary"]["output_tokens_per_s"] if result["offline"] else None
    result["capacity_rps"], result["capacity_censored"] = (cap.rps, cap.censored) if rates else (None, False)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        args.tokenizer = default_model_dir()
    classes = tuple(PriorityClass.parse(c) for c in args.classes) or DEFAULT_CLASSES
    max_len = args.max_model_len or _model_len(args.tokenizer)
    rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    if args.workload_file:
        specs, name = load_file(args.workload_file, classes), str(args.workload_file)
    else:  # offline uses the first --num-requests; the sweep as many as its highest rate needs
        pool = max([args.num_requests, *(sweep_size(r, args.sweep_seconds) for r in rates)])
        specs, name = generate(args.workload, pool, max_len, args.seed, args.long_share, classes), args.workload
    print(f"[bench] making prompts with the tokenizer of {args.tokenizer}", file=sys.stderr, flush=True)
    specs = materialize(specs, PromptMaker(AutoTokenizer.from_pretrained(args.tokenizer), corpus_text()), args.seed)
    offline = specs if args.workload_file else specs[:args.num_requests]
    description = describe(name, offline, classes)
    print(f"[bench] workload: {description}", file=sys.stderr, flush=True)
    urls = [t.strip() for t in args.targets.split(",") if t.strip()]
    targets = [parse_target(url) for url in urls]
    results: dict[str, Any] = {
        "environment": provenance.machine(),
        "workload": {"name": name, "description": description, "requests": len(offline), "seed": args.seed,
                     "max_model_len": max_len},
        "classes": [asdict(c) for c in classes], "classes_text": classes_text(classes),
        "sweep": {"rates": rates, "arrival": args.arrival, "cv": args.cv, "seconds": args.sweep_seconds},
        "targets": {},
    }
    for url, target in zip(urls, targets):
        outcome = await bench_target(target, offline, specs, args, rates)
        label = target.label
        while label in results["targets"]:  # the same target twice (e.g. to see run-to-run variation)
            label += "'"
        results["targets"][label] = {"url": url, "server": await target.describe(), **outcome}
    return report.merge([results])


def main(args: argparse.Namespace) -> int:
    try:
        results = asyncio.run(run(args))
    except (ValueError, OSError) as e:
        print(f"[bench] ERROR: {e}", file=sys.stderr)
        return 2
    print(report.markdown(results))
    if args.out:
        for path in report.write(results, args.out):
            print(f"[bench] wrote {path}", file=sys.stderr)
    return 0
