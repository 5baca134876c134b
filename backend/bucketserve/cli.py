"""`bucketserve`: start the server, or build the default model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bucketserve import model_builder, policy_bench, server
from bucketserve.config import MODEL_PATH_ENV

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _serve(args: argparse.Namespace) -> int:
    if args.model_path is None:
        default = model_builder.default_model_dir()
        if not model_builder.is_built(default):
            print(f"[bucketserve] default model missing; building it in {default} (once)", flush=True)
            model_builder.build(default)
    elif not args.model_path.is_dir():
        print(f"[bucketserve] ERROR: --model-path {args.model_path} is not a directory", file=sys.stderr)
        return 2
    try:
        return server.serve(args.model_repository, args.model_path, args.http_port, args.grpc_port,
                            args.metrics_port, args.address, args.ready_timeout, args.tritonserver_arg,
                            args.stub_watch_s)
    except server.LaunchError as e:
        print(f"[bucketserve] ERROR: {e}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bucketserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start tritonserver with the BucketServe model repository")
    s.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="Triton model repository (default: this checkout's model_repository/)")
    env_model = os.environ.get(MODEL_PATH_ENV)
    s.add_argument("--model-path", type=Path, default=Path(env_model) if env_model else None,
                   help=f"Hugging Face causal-LM directory; overrides model_path in config.pbtxt (default ${MODEL_PATH_ENV})")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--address", default="127.0.0.1",
                   help="address all three ports listen on (default loopback; 0.0.0.0 to expose them)")
    s.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for READY")
    s.add_argument("--tritonserver-arg", action="append", default=[],
                   help="extra tritonserver flag, e.g. --tritonserver-arg=--log-verbose=1 (repeatable)")
    s.add_argument("--stub-watch-s", type=float, default=1.0,
                   help="how often to check the models' Python stub processes; when one has died, stop "
                        "tritonserver (exit code 3) so health checks fail and a supervisor restarts it. 0: off")
    s.set_defaults(func=_serve)
    b = sub.add_parser("build-model", help="write the default model (seeded random Llama + BPE tokenizer)")
    model_builder.add_arguments(b)
    b.set_defaults(func=model_builder.main)
    q = sub.add_parser("bench-policies", help="offline mixed workload through each scheduling policy, in one process")
    policy_bench.add_arguments(q)
    q.set_defaults(func=policy_bench.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
