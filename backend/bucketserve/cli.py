"""`bucketserve`: start the server, run a batch file offline, build the default model, benchmark the policies,
serve the OpenAI API in front of Triton, or simulate the scheduler on other hardware."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bucketserve.config import MODEL_PATH_ENV, ConfigError, parse_param

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _serve(args: argparse.Namespace) -> int:
    from bucketserve.launcher import server
    from bucketserve.tools.model_builder import ensure_default_model

    try:
        params = dict(parse_param(p) for p in args.param)
    except ConfigError as e:
        print(f"[bucketserve] ERROR: --param: {e}", file=sys.stderr)
        return 2
    if args.model_path is None:
        ensure_default_model(log=lambda m: print(m, flush=True))
    elif not args.model_path.is_dir():
        print(f"[bucketserve] ERROR: --model-path {args.model_path} is not a directory", file=sys.stderr)
        return 2
    try:
        return server.serve(args.model_repository, args.model_path, args.http_port, args.grpc_port,
                            args.metrics_port, args.address, args.ready_timeout, args.tritonserver_arg,
                            args.stub_watch_s, args.openai_port, params)
    except server.LaunchError as e:
        print(f"[bucketserve] ERROR: {e}", file=sys.stderr)
        return 1


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="start tritonserver with the BucketServe model repository")
    s.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="Triton model repository (default: this checkout's model_repository/)")
    env_model = os.environ.get(MODEL_PATH_ENV)
    s.add_argument("--model-path", type=Path, default=Path(env_model) if env_model else None,
                   help=f"Hugging Face causal-LM directory; overrides model_path in config.pbtxt (default ${MODEL_PATH_ENV})")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--openai-port", type=int, default=0,
                   help="also serve OpenAI's API (/v1/chat/completions, /v1/completions) on this port, on the same "
                        "address; it starts once Triton is READY and stops with it (0: off). "
                        "API key: $BUCKETSERVE_API_KEY")
    s.add_argument("--address", default="127.0.0.1",
                   help="address all three ports listen on (default loopback; 0.0.0.0 to expose them)")
    s.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for READY")
    s.add_argument("--tritonserver-arg", action="append", default=[],
                   help="extra tritonserver flag, e.g. --tritonserver-arg=--log-verbose=1 (repeatable)")
    s.add_argument("--stub-watch-s", type=float, default=1.0,
                   help="how often to check the models' Python stub processes; when one has died, stop "
                        "tritonserver (exit code 3) so health checks fail and a supervisor restarts it. 0: off")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter for every model in the repository, in place of config.pbtxt's, e.g. "
                        "--param dtype=bfloat16 --param max_num_seqs=32 (repeatable; the README lists them)")
    s.set_defaults(func=_serve)


def parser() -> argparse.ArgumentParser:
    from bucketserve.openai import gateway
    from bucketserve.sim import cli as simulate
    from bucketserve.tools import generate, model_builder, policy_bench

    p = argparse.ArgumentParser(prog="bucketserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    g = sub.add_parser("generate", help="run a JSONL batch of prompts offline, in process, with a progress bar")
    generate.add_arguments(g)
    g.set_defaults(func=generate.main)
    b = sub.add_parser("build-model", help="write the default model (seeded random Llama + BPE tokenizer)")
    model_builder.add_arguments(b)
    b.set_defaults(func=model_builder.main)
    q = sub.add_parser("bench-policies", help="offline mixed workload through each scheduling policy, in one process")
    policy_bench.add_arguments(q)
    q.set_defaults(func=policy_bench.main)
    o = sub.add_parser("openai-gateway", help="serve OpenAI-compatible /v1/completions in front of Triton")
    gateway.add_arguments(o)
    o.set_defaults(func=gateway.main)
    simulate.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """``argv`` None: run as the program, which first re-executes itself under tcmalloc where found."""
    if argv is None:
        from bucketserve.launcher import allocator

        allocator.reexec()
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
