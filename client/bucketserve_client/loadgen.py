"""Open-loop load: send each request at its arrival time whatever the server is doing, record what
came back, and sample the server's buckets while the run lasts."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from bucketserve_client import scrape
from bucketserve_client.stats import Outcome
from bucketserve_client.targets import Target
from bucketserve_client.workload import RequestSpec

SAMPLE_INTERVAL_S = 0.5
SETTLE_S = 3.0


class _Lines:
    """A log file's view of a progress bar: each redraw on a line of its own."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text.rstrip("\n") + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(label: str, total: int) -> tqdm:
    """One bar per run: redrawn in place on a terminal, a line every 10 s otherwise (so logs stay short)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=label, file=sys.stderr if tty else _Lines(sys.stderr),
                mininterval=0.1 if tty else 10.0, ascii=not tty,
                bar_format="{desc}: [{bar:30}] {n_fmt}/{total_fmt} requests{postfix}, {elapsed}")


@dataclass
class RunRecord:
    outcomes: list[Outcome]
    samples: list[scrape.Sample] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)
    """Figures from the server's counters over the run (padding shares, batches), when it has them."""


async def _metrics(session: Any, url: str, model: str) -> dict:
    async with session.get(url) as r:
        return scrape.series(await r.text(), model)


async def _settled(session: Any, url: str, model: str, before: dict, outcomes: list[Outcome | None]) -> dict[str, float]:
    """Run figures once the metrics port has caught up with the last response (it refreshes just
    after responses are sent), or after SETTLE_S."""
    want = sum(o.output_tokens for o in outcomes if o is not None)
    deadline = time.perf_counter() + SETTLE_S
    while True:
        figures = scrape.run_figures(before, await _metrics(session, url, model))
        if figures["server_output_tokens"] >= want or time.perf_counter() > deadline:
            return figures
        await asyncio.sleep(0.1)


async def run(target: Target, specs: list[RequestSpec], times: list[float], label: str) -> RunRecord:
    """Send ``specs[i]`` at ``times[i]`` seconds from now; return when every request has its final response."""
    import aiohttp

    bar = progress(label, len(specs))
    failed = 0
    outcomes: list[Outcome | None] = [None] * len(specs)
    samples: list[scrape.Sample] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal failed
        await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - start)))
        sent = time.perf_counter() - start
        try:
            reply = await target.send(specs[i])
        except Exception as e:  # a transport failure fails this request, not the run
            outcomes[i] = Outcome(specs[i].cls.name, sent, None, None, 0, specs[i].cls.ttft_ms / 1000,
                                  specs[i].cls.e2e_ms / 1000, f"{type(e).__name__}: {e}")
        else:
            outcomes[i] = Outcome(specs[i].cls.name, sent, reply.ttft, reply.e2e, reply.output_tokens,
                                  specs[i].cls.ttft_ms / 1000, specs[i].cls.e2e_ms / 1000, reply.error)
        if not outcomes[i].ok:
            failed += 1
            bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        url = target.metrics_url
        before = await _metrics(session, url, target.model) if url else {}

        async def sampler() -> None:
            while True:
                t = time.perf_counter() - start
                try:
                    samples.append(scrape.sample(t, await _metrics(session, url, target.model)))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass  # a missed sample is a gap in a plot, not a failed run
                await asyncio.sleep(SAMPLE_INTERVAL_S)

        watcher = asyncio.create_task(sampler()) if url else None
        await asyncio.gather(*(one(i) for i in range(len(specs))))
        bar.close()
        if watcher is not None:
            watcher.cancel()
        server = await _settled(session, url, target.model, before, outcomes) if url else {}
    return RunRecord([o for o in outcomes if o is not None], samples, server)
