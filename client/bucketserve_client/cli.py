"""`bucketserve-client generate PROMPT [--stream]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bucketserve_client import bench, report
from bucketserve_client.client import BucketServeClient, BucketServeError
from bucketserve_client.perf_tools import perf_analyzer_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bucketserve-client")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--url", default="localhost:8001", help="Triton gRPC address HOST:PORT")
    g.add_argument("--model", default="bucketserve")
    r = sub.add_parser("report", help="one report (results.json, report.md, plots) from several bench runs of the same "
                                      "workload, e.g. servers measured one after the other")
    r.add_argument("results", nargs="+", type=Path, help="results.json files written by bench --out")
    r.add_argument("--out", type=Path, required=True)
    pa = sub.add_parser("perf-analyzer", help="run perf_analyzer with the libraries it needs on LD_LIBRARY_PATH")
    pa.add_argument("args", nargs=argparse.REMAINDER, help="perf_analyzer's own arguments, after --")
    b = sub.add_parser("bench", help="the paper's evaluation (offline throughput, SLO sweep, capacity) against one or more targets")
    bench.add_arguments(b)
    args = p.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "report":
        merged = report.merge([json.loads(path.read_text()) for path in args.results])
        print(report.markdown(merged))
        for path in report.write(merged, args.out):
            print(f"[report] wrote {path}", file=sys.stderr)
        return 0
    if args.command == "perf-analyzer":
        exe, env = perf_analyzer_command()
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        os.execvpe(exe, [exe, *rest], env)

    client = BucketServeClient(args.url, args.model)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        if args.stream:
            for delta in client.stream(args.prompt, **sampling):
                print(delta, end="", flush=True)
            print()
        else:
            c = client.generate(args.prompt, **sampling)
            print(c.text)
            print(f"[finish_reason={c.finish_reason} input_tokens={c.num_input_tokens} "
                  f"output_tokens={c.num_output_tokens}]", file=sys.stderr)
    except BucketServeError as e:
        print(f"error ({e.status}): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
