"""Exactly-once under stress: many concurrent streams of mixed requests (streaming and not, gRPC and
HTTP, some cancelled by their client, some malformed) against a running server.

Every request that is not cancelled must get exactly one final answer with nothing after it; every
completed greedy request must carry exactly the text its prompt gets when sent alone (no cross-talk
inside a batch); malformed ones get one error. ``python -m tests.stress --grpc HOST:PORT --http
HOST:PORT --requests 2000 --concurrency 64`` runs the full size (``make stress``); the test suite runs
a small one.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tritonclient.grpc as grpcclient

from bucketserve_client.client import build_inputs, is_final, response_fields
from tests.bad_inputs import CASES

MODEL = "bucketserve"
QUIET_S = 0.1
"""After a final answer the stream is watched this long for anything that should not come."""
PROMPTS = [
    "def add(a, b):\n    return",
    "The history of the city begins with",
    "import os\nimport sys\n\nclass Loader:\n    def __init__(self, path):\n        self.path =",
    "for i in range(10):\n    print(i)\n" * 6,
    "x = 1",
    "Once upon a time, in a kingdom by the sea, " * 12,
    "    # parse the header of the request and return the status line\n" * 20,
    "try:\n    value = compute()\nexcept ValueError:\n",
]
MAX_TOKENS = (4, 9, 17)
CANCEL_TOKENS = 96
"""Cancelled requests stream this many tokens and are left after the first. Triton 2.51's gRPC frontend
leaks a request's state when the cancellation races the final response (fixed upstream in server PR
#8078), and the model then cannot unload at shutdown; our client never cancels a finished request, and
this keeps the race out of the test."""
BAD = [(c.sampling, c.message) for c in CASES if c.sampling_only]
"""Malformed requests the run mixes in: the bad-input table's cases that are a sampling_parameters dict alone."""


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    finals: Counter = field(default_factory=Counter)
    """How many final answers each non-cancelled request got (all must be 1)."""
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, finals: int | None, problem: str | None) -> None:
        with self.lock:
            self.sent[kind] += 1
            if finals is not None:
                self.finals[finals] += 1
            if problem:
                self.problems.append(f"{kind}: {problem}")


def grpc_request(url: str, prompt: str, sampling: dict, stream: bool, cancel: bool) -> tuple[list, str | None]:
    """(answers until the final one and the quiet period after it, error text) for one gRPC request."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    answers: list = []
    try:
        client.async_stream_infer(MODEL, build_inputs(prompt, stream, sampling), enable_empty_final_response=True)
        deadline = time.monotonic() + 120
        while True:
            result, error = got.get(timeout=max(0.01, deadline - time.monotonic()))
            answers.append((result, error))
            if cancel:  # leave after the first answer: the server must cancel and free the sequence
                return answers, None
            if error is not None or is_final(result):
                break
        while True:
            try:
                answers.append(got.get(timeout=QUIET_S))
            except queue.Empty:
                return answers, None
    except queue.Empty:
        return answers, "no final answer within 120 s"
    finally:
        client.stop_stream(cancel_requests=cancel)
        client.close()


def check_grpc(answers: list, expected: str | None, bad: str | None) -> tuple[int, str | None]:
    finals = sum(1 for r, e in answers if e is not None or is_final(r))
    errors = [e.message() for _, e in answers if e is not None]
    last_final = max(i for i, (r, e) in enumerate(answers) if e is not None or is_final(r)) if finals else -1
    if finals != 1:
        return finals, f"{finals} final answers"
    if last_final != len(answers) - 1:
        return finals, "an answer came after the final one"
    if bad is not None:
        return finals, None if errors and bad in errors[0] else f"expected an error with {bad!r}, got {errors}"
    if errors:
        return finals, f"unexpected error {errors[0]}"
    text = "".join(response_fields(r)[0] for r, _ in answers)
    return finals, None if text == expected else f"text {text!r} != expected {expected!r}"


def http_request(http: str, prompt: str, sampling: dict, bad: str | None, expected: str | None) -> str | None:
    # as sampling_parameters: Triton's generate endpoint would itself refuse a word where a number input goes
    body = json.dumps({"text_input": prompt, "exclude_input_in_output": True,
                       "sampling_parameters": json.dumps(sampling)}).encode()
    req = urllib.request.Request(f"http://{http}/v2/models/{MODEL}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.loads(r.read())["text_output"]
    except urllib.error.HTTPError as e:
        message = e.read().decode()
        return None if bad is not None and e.code == 400 and bad in message else f"HTTP {e.code}: {message[:200]}"
    if bad is not None:
        return f"expected an error with {bad!r}, got text"
    return None if text == expected else f"text {text!r} != expected {expected!r}"


def expected_texts(url: str) -> dict[tuple[int, int], str]:
    """Each (prompt, max_tokens) sent alone: the reference every batched answer must equal."""
    out = {}
    for p, prompt in enumerate(PROMPTS):
        for n in MAX_TOKENS:
            answers, error = grpc_request(url, prompt, {"max_tokens": n, "temperature": 0}, False, False)
            assert error is None
            out[(p, n)] = "".join(response_fields(r)[0] for r, _ in answers if r is not None)
    return out


def run(grpc_url: str, http: str, requests: int, concurrency: int, seed: int = 0, cancel_share: float = 0.1,
        bad_share: float = 0.05, http_share: float = 0.1, progress: bool = False) -> Tally:
    expected = expected_texts(grpc_url)
    rng = random.Random(seed)
    plan = [(rng.randrange(len(PROMPTS)), rng.choice(MAX_TOKENS), rng.random(), rng.random(), rng.random(),
             rng.choice(BAD)) for _ in range(requests)]
    tally = Tally()
    done = [0]

    def one(item: tuple) -> None:
        p, n, u_bad, u_http, u_mode, (bad_params, bad_text) = item
        bad = bad_text if u_bad < bad_share else None
        sampling = {"max_tokens": n, "temperature": 0, **(bad_params if bad else {})}
        want = expected[(p, n)]
        if u_http < http_share:
            tally.record("http" + ("-bad" if bad else ""), 1, http_request(http, PROMPTS[p], sampling, bad, want))
        else:
            cancel = bad is None and u_mode < cancel_share
            stream = cancel or u_mode >= 0.5
            if cancel:  # left mid-stream, far from its end: see CANCEL_TOKENS
                sampling["max_tokens"] = CANCEL_TOKENS
            answers, error = grpc_request(grpc_url, PROMPTS[p], sampling, stream, cancel)
            kind = "grpc-" + ("cancelled" if cancel else "bad" if bad else "stream" if stream else "oneshot")
            if cancel:
                tally.record(kind, None, error)
            else:
                finals, problem = check_grpc(answers, want, bad)
                tally.record(kind, finals, error or problem)
        with tally.lock:
            done[0] += 1
            if progress and done[0] % max(1, requests // 20) == 0:
                print(f"[stress] {done[0]}/{requests} requests, {len(tally.problems)} problems", file=sys.stderr,
                      flush=True)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, plan))
    return tally


def settled(metrics_url: str, model: str = MODEL, timeout: float = 30) -> dict[str, float]:
    """The model's running and waiting counts once they reach zero (or after ``timeout``)."""
    from bucketserve_client.scrape import series, value

    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            found = series(r.read().decode(), model)
        state = {"running": value(found, "bucketserve_requests_running"),
                 "waiting": value(found, "bucketserve_queue_depth")}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grpc", default="127.0.0.1:8001")
    p.add_argument("--http", default="127.0.0.1:8000")
    p.add_argument("--metrics", default="127.0.0.1:8002")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    tally = run(args.grpc, args.http, args.requests, args.concurrency, args.seed, progress=True)
    state = settled(f"http://{args.metrics}/metrics")
    print(f"[stress] {sum(tally.sent.values())} requests in {time.perf_counter() - start:.0f} s over "
          f"{args.concurrency} streams: {dict(tally.sent)}")
    print(f"[stress] final answers per (not cancelled) request: {dict(tally.finals)}; afterwards running "
          f"{state['running']:.0f}, waiting {state['waiting']:.0f}")
    for problem in tally.problems[:20]:
        print(f"[stress] PROBLEM {problem}")
    ok = not tally.problems and set(tally.finals) == {1} and not any(state.values())
    print(f"[stress] {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
