"""Load over time against a running server: a soak (memory must not grow) and a 10x burst (the
server must shed what it cannot serve, keep KV under its budget, and come back to normal latency).

``python -m tests.endurance soak --grpc H:P --metrics H:P --server-pid PID`` (``make soak``): mixed
requests as Poisson arrivals for ``--minutes``; samples the server's RSS (its whole process tree) and
KV bytes every few seconds; fails if RSS grew by 5% or more between the first and last tenth of the
run (after a warm-up tenth), or if KV is not back to zero once idle.

``python -m tests.endurance burst ...`` (``make burst``): a base rate, then ``--burst-factor`` x the
capacity for ``--burst-s``, then the base rate again; reports refused and expired requests, the KV
peak against the budget, and how long after the burst latency was back to its base level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bucketserve_client import loadgen, scrape
from bucketserve_client.arrivals import arrival_times
from bucketserve_client.stats import Outcome, percentile
from bucketserve_client.defaults import corpus_text, default_model_dir
from bucketserve_client.targets import TritonTarget
from bucketserve_client.workload import PromptMaker, RequestSpec, generate, materialize

MODEL = "bucketserve"
MAX_GROWTH = 0.05
OVERLOADED, EXPIRED = "server is overloaded", "deadline exceeded"


@dataclass
class Point:
    t: float
    rss_bytes: int
    kv_bytes: float
    waiting: float


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (tritonserver and the models' stubs)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def metrics(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return scrape.series(r.read().decode(), MODEL)


def point(t: float, pid: int, address: str) -> Point:
    found = metrics(address)
    waiting = sum(v for _, v in found.get("bucketserve_queue_depth", []))
    return Point(t, tree_rss(pid), scrape.value(found, "bucketserve_kv_cache_bytes"), waiting)


class Recorder(threading.Thread):
    """Samples RSS and KV every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, address: str, interval: float):
        super().__init__(daemon=True)
        self.pid, self.address, self.interval = pid, address, interval
        self.points: list[Point] = []
        self.start_time = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.points.append(point(time.monotonic() - self.start_time, self.pid, self.address))
            self._halt.wait(self.interval)

    def stop(self) -> list[Point]:
        self._halt.set()
        self.join()
        return self.points


def workload(n: int, seed: int, tokenizer: str, max_len: int) -> list[RequestSpec]:
    from transformers import AutoTokenizer

    specs = generate("mixed", n, max_len, seed)
    return materialize(specs, PromptMaker(AutoTokenizer.from_pretrained(tokenizer), corpus_text()), seed)


def default_tokenizer() -> str:
    return str(default_model_dir())


def window(points: list[Point], start: float, end: float) -> list[Point]:
    """The points between these fractions of the run."""
    span = points[-1].t
    return [p for p in points if start * span <= p.t <= end * span]


def soak(args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    n = int(args.rate * seconds)
    specs = workload(n, args.seed, args.tokenizer, args.max_model_len)
    times = arrival_times("poisson", n, args.rate, args.seed)
    target = TritonTarget(f"triton://{args.grpc}/{MODEL}?metrics={args.metrics.split(':')[1]}")
    print(f"[soak] {n} mixed requests at {args.rate:g} req/s for {args.minutes:g} min; sampling RSS and KV "
          f"every {args.interval:g} s", flush=True)
    recorder = Recorder(args.server_pid, args.metrics, args.interval)
    recorder.start()
    record = asyncio.run(run_and_close(target, specs, times, "soak"))
    time.sleep(args.interval * 2)  # idle: KV must be back to zero
    points = recorder.stop()
    # the first three tenths warm up: allocator pools, the tokenizer's caches, and on the paged executor the
    # batch shapes met for the first time (RSS rose for 3-4 of 10 minutes under glibc and under tcmalloc, then
    # 1.0% and 1.8% to the end); compare the fourth tenth with the last
    early, late = (statistics.mean(p.rss_bytes for p in window(points, a, b)) for a, b in ((0.3, 0.4), (0.9, 1.0)))
    growth = late / early - 1
    idle_kv = points[-1].kv_bytes
    kv_early, kv_late = (max(p.kv_bytes for p in window(points, a, b)) for a, b in ((0.1, 0.5), (0.5, 0.95)))
    ok = sum(o.ok for o in record.outcomes)
    figures = {"requests": n, "ok": ok, "errors": n - ok, "minutes": args.minutes, "rate": args.rate,
               "rss_early_mib": early / 2**20, "rss_late_mib": late / 2**20, "rss_growth": growth,
               "kv_peak_first_half_mib": kv_early / 2**20, "kv_peak_second_half_mib": kv_late / 2**20,
               "kv_idle_bytes": idle_kv}
    print(f"[soak] {ok}/{n} requests ok; RSS {early / 2**20:.0f} MiB -> {late / 2**20:.0f} MiB "
          f"({growth:+.1%}); KV peak {kv_early / 2**20:.1f} MiB (first half) vs {kv_late / 2**20:.1f} MiB "
          f"(second half); KV when idle {idle_kv:.0f} bytes", flush=True)
    write(args.out, "soak", figures, points, record.outcomes)
    plot_soak(args.out / "soak.png", points)
    failed = growth >= MAX_GROWTH or idle_kv != 0
    print(f"[soak] {'FAIL' if failed else 'PASS'}: RSS growth must stay under {MAX_GROWTH:.0%} and KV "
          f"return to 0 when idle", flush=True)
    return int(failed)


async def run_and_close(target: TritonTarget, specs: list[RequestSpec], times: list[float], label: str):
    try:
        return await loadgen.run(target, specs, times, label)
    finally:
        await target.close()


def phase_times(phases: list[tuple[float, float]], seed: int) -> list[float]:
    """Poisson arrivals at each (rate, seconds) phase in turn."""
    times, offset = [], 0.0
    for i, (rate, seconds) in enumerate(phases):
        n = int(rate * seconds)
        times += [offset + t for t in arrival_times("poisson", n, rate, seed + i) if t < seconds]
        offset += seconds
    return times


def recovery_s(outcomes: list[Outcome], burst_end: float, limit: float, window_s: float = 5.0) -> float | None:
    """Seconds after the burst until the median TTFT of every later ``window_s`` of sends is <= ``limit``
    with no errors (single requests vary with their prompt's length, so windows are judged)."""
    last = max(o.sent for o in outcomes)
    starts = [burst_end + i * window_s for i in range(int((last - burst_end) // window_s) + 1)]
    recovered = None
    for start in starts:
        sent = [o for o in outcomes if start <= o.sent < start + window_s]
        ttfts = [o.ttft for o in sent if o.ok and o.ttft is not None]
        good = len(ttfts) == len(sent) and (not ttfts or statistics.median(ttfts) <= limit)
        if not good:
            recovered = None
        elif recovered is None:
            recovered = start - burst_end
    return recovered


def drained_s(points: list[Point], burst_end: float) -> float | None:
    """Seconds after the burst until the queue was first empty again."""
    return next((p.t - burst_end for p in points if p.t >= burst_end and p.waiting == 0), None)


def burst(args: argparse.Namespace) -> int:
    burst_rate = args.burst_factor * args.capacity
    phases = [(args.base_rate, args.base_s), (burst_rate, args.burst_s), (args.base_rate, args.recover_s)]
    times = phase_times(phases, args.seed)
    specs = workload(len(times), args.seed, args.tokenizer, args.max_model_len)
    target = TritonTarget(f"triton://{args.grpc}/{MODEL}?metrics={args.metrics.split(':')[1]}")
    print(f"[burst] {args.base_rate:g} req/s for {args.base_s:g} s, {burst_rate:g} req/s ({args.burst_factor:g}x "
          f"capacity {args.capacity:g}) for {args.burst_s:g} s, {args.base_rate:g} req/s for {args.recover_s:g} s: "
          f"{len(times)} requests", flush=True)
    recorder = Recorder(args.server_pid, args.metrics, args.interval)
    recorder.start()
    record = asyncio.run(run_and_close(target, specs, times, "burst"))
    points = recorder.stop()
    found = metrics(args.metrics)
    budget, kv_peak = (scrape.value(found, f"bucketserve_kv_cache_{k}_bytes") for k in ("budget", "peak"))
    burst_start, burst_end = args.base_s, args.base_s + args.burst_s
    base = [o.ttft for o in record.outcomes if o.sent < burst_start and o.ok and o.ttft is not None]
    limit = 2 * percentile(base, 90)
    in_burst = [o for o in record.outcomes if burst_start <= o.sent < burst_end]
    count = lambda outcomes, text: sum(bool(o.error and text in o.error) for o in outcomes)  # noqa: E731
    figures = {
        "requests": len(record.outcomes), "burst_requests": len(in_burst), "burst_rate": burst_rate,
        "ok": sum(o.ok for o in record.outcomes),
        "refused_overloaded": count(record.outcomes, OVERLOADED), "expired_deadline": count(record.outcomes, EXPIRED),
        "other_errors": sum(bool(o.error and OVERLOADED not in o.error and EXPIRED not in o.error)
                            for o in record.outcomes),
        "base_ttft_p50_s": percentile(base, 50), "base_ttft_p90_s": percentile(base, 90),
        "queue_drained_s": drained_s(points, burst_end),
        "recovery_limit_ttft_s": limit, "recovery_s": recovery_s(record.outcomes, burst_end, limit),
        "max_waiting": max(p.waiting for p in points), "kv_peak_bytes": kv_peak, "kv_budget_bytes": budget,
    }
    print("[burst] " + json.dumps(figures, indent=1), flush=True)
    write(args.out, "burst", figures, points, record.outcomes)
    plot_burst(args.out / "burst.png", record.outcomes, points, burst_start, burst_end, limit)
    failed = kv_peak > budget or figures["recovery_s"] is None or figures["other_errors"]
    print(f"[burst] {'FAIL' if failed else 'PASS'}: KV within budget, no errors but refusals and expiries, "
          f"median TTFT back under {limit:.2f} s (2x the base p90)", flush=True)
    return int(bool(failed))


def write(out: Path, name: str, figures: dict, points: list[Point], outcomes: list[Outcome]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"figures": figures, "samples": [asdict(p) for p in points],
                                                  "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    print(f"[{name}] wrote {out / f'{name}.json'}", flush=True)


def plot_soak(path: Path, points: list[Point]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, kv) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    t = [p.t / 60 for p in points]
    rss.plot(t, [p.rss_bytes / 2**20 for p in points])
    rss.set_ylabel("server RSS (MiB)")
    rss.set_ylim(bottom=0)
    kv.plot(t, [p.kv_bytes / 2**20 for p in points], color="tab:orange")
    kv.set_ylabel("KV cache (MiB)")
    kv.set_xlabel("minutes")
    fig.suptitle("Soak: server memory over time under mixed load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[soak] wrote {path}", flush=True)


def plot_burst(path: Path, outcomes: list[Outcome], points: list[Point], start: float, end: float,
               limit: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, queue) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    answered = [o for o in outcomes if o.ok and o.ttft is not None]
    lat.scatter([o.sent for o in answered], [o.ttft for o in answered], s=4, color="tab:blue", label="answered")
    for label, text, color in (("refused (overloaded)", OVERLOADED, "tab:red"), ("expired (deadline)", EXPIRED, "tab:gray")):
        shown = [o for o in outcomes if o.error and text in o.error]
        lat.scatter([o.sent for o in shown], [0] * len(shown), s=4, marker="|", color=color, label=label)
    lat.axhline(limit, ls="--", color="k", lw=0.8, label="recovered: 5 s medians below")
    lat.set_ylabel("TTFT (s)")
    lat.legend(fontsize=8, loc="upper right")
    queue.plot([p.t for p in points], [p.waiting for p in points])
    queue.set_ylabel("requests waiting")
    queue.set_xlabel("seconds")
    for ax in (lat, queue):
        ax.axvspan(start, end, color="tab:red", alpha=0.08)
    fig.suptitle("Burst: latency and queue through a 10x-capacity burst (shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[burst] wrote {path}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.endurance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func in (("soak", soak), ("burst", burst)):
        s = sub.add_parser(name)
        s.set_defaults(func=func)
        s.add_argument("--grpc", required=True, help="HOST:PORT of the server's gRPC endpoint")
        s.add_argument("--metrics", required=True, help="HOST:PORT of its metrics endpoint")
        s.add_argument("--server-pid", type=int, required=True, help="the server's pid (RSS counts its process tree)")
        s.add_argument("--tokenizer", default=default_tokenizer(), help="model directory whose tokenizer sizes prompts")
        s.add_argument("--max-model-len", type=int, default=2048)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--interval", type=float, default=5.0 if name == "soak" else 1.0, help="seconds between samples")
        s.add_argument("--out", type=Path, default=Path("artifacts") / name)
    soak_p, burst_p = sub.choices["soak"], sub.choices["burst"]
    soak_p.add_argument("--minutes", type=float, default=10.0)
    soak_p.add_argument("--rate", type=float, default=2.0, help="offered requests per second")
    burst_p.add_argument("--capacity", type=float, default=7.0,
                         help="req/s the server sustains at 80%% SLO attainment (make bench measures it)")
    burst_p.add_argument("--burst-factor", type=float, default=10.0)
    burst_p.add_argument("--base-rate", type=float, default=1.0)
    burst_p.add_argument("--base-s", type=float, default=20.0)
    burst_p.add_argument("--burst-s", type=float, default=20.0)
    burst_p.add_argument("--recover-s", type=float, default=60.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
