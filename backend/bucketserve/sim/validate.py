"""The real engine, in process, on the requests and arrival times a simulation ran: what the simulator's
error is measured against (``bucketserve simulate validate``).

Requests are submitted at their arrival times from this thread; times are the engine's own (arrival to
first token, arrival to end), as the simulator reports them, so the front end and the network are left
out of both.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from bucketserve.config import EngineConfig
from bucketserve.engine.outputs import RequestOutput
from bucketserve.engine.request import Priority, Request, SamplingParams
from bucketserve.factory import LoadedModel, build_engine
from bucketserve.sim.runner import figures, outcome
from bucketserve_client.stats import Outcome
from bucketserve_client.workload import RequestSpec


def prompt_ids(index: int, length: int, vocab: int) -> list[int]:
    """Token ids of a prompt: content does not change a step's time (greedy, EOS ignored)."""
    return [(7 * index + j) % vocab for j in range(length)]


def run_real(model: LoadedModel, config: EngineConfig, specs: list[RequestSpec], times: list[float],
             on_finish: Callable[[int], None] = lambda _n: None) -> tuple[list[Outcome], dict[str, float]]:
    """Run ``specs[i]`` submitted at ``times[i]`` seconds from the start; the outcomes and the engine's
    figures (as ``simulate`` reports them)."""

    cond = threading.Condition()
    finished = 0

    def on_output(outputs: list[RequestOutput]) -> None:
        nonlocal finished
        ended = sum(o.finished for o in outputs)
        with cond:
            finished += ended
            cond.notify_all()
        on_finish(ended)

    engine = build_engine(config, model, on_output, log=lambda _m: None)
    vocab = model.tokenizer.vocab_size
    prepared = [(spec, prompt_ids(i, spec.prompt_len, vocab),
                 SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True))
                for i, spec in enumerate(specs)]
    engine.start()
    requests: list[Request] = []
    start = time.monotonic()
    for (spec, ids, sampling), at in zip(prepared, times):
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # an open-loop arrival process: the next request is due then
        request = engine.make_request("", sampling, Priority(spec.cls.priority), spec.slo_ms, prompt_ids=ids)
        engine.submit(request)
        requests.append(request)
    with cond:
        cond.wait_for(lambda: finished >= len(requests))
    engine.stop()
    outcomes = [outcome(spec, request, origin=start) for spec, request in zip(specs, requests)]
    end = max((o.sent + (o.e2e or 0) for o in outcomes), default=0.0)
    return outcomes, figures(engine.stats, engine.stats.step_seconds, end)
