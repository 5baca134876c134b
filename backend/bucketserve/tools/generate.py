"""`bucketserve generate --input FILE.jsonl --output FILE.jsonl`: a batch file run offline, in process.

Each input line is a JSON object with ``prompt`` and any sampling parameter the server takes, named as
in ``sampling_parameters`` (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
``ignore_eos``, ``min_tokens``, ``priority``; ``slo_ms`` is refused: nothing waits offline). Each output
line, in input order: ``prompt``, ``text``, ``finish_reason``, ``num_input_tokens``,
``num_output_tokens`` and ``error`` (null unless it failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bucketserve.config import EngineConfig
from bucketserve.engine.params import from_mapping, request_fields
from bucketserve.engine.request import InvalidInput, Priority, SamplingParams


def read_jobs(path: Path, config: EngineConfig) -> tuple[list[str], list[SamplingParams], list[Priority]]:
    prompts, params, priorities = [], [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise InvalidInput("each line must be a JSON object with a string \"prompt\"")
                values = from_mapping(f"line {number}", {k: v for k, v in row.items() if k != "prompt"})
                if "slo_ms" in values:
                    raise InvalidInput("slo_ms has no meaning offline")
                sampling, priority, _ = request_fields(values, config.default_max_tokens, config.default_temperature)
            except (json.JSONDecodeError, InvalidInput) as e:
                raise InvalidInput(f"{path}:{number}: {e}") from None
            prompts.append(row["prompt"])
            params.append(sampling)
            priorities.append(priority)
    return prompts, params, priorities


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=Path, required=True, help="JSONL file: one {\"prompt\": ..., sampling...} per line")
    p.add_argument("--output", type=Path, required=True, help="JSONL file to write, one result per input line")
    p.add_argument("--model-path", type=Path, default=None, help="Hugging Face causal-LM directory (default model)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine parameter, as in config.pbtxt (repeatable), e.g. scheduler_policy=continuous")


def main(args: argparse.Namespace) -> int:
    from bucketserve.llm import LLM

    config = EngineConfig.from_parameters(dict(kv.split("=", 1) for kv in args.param))
    try:
        prompts, params, priorities = read_jobs(args.input, config)
    except InvalidInput as e:
        print(f"[generate] ERROR: {e}", file=sys.stderr)
        return 2
    with LLM(str(args.model_path) if args.model_path else None, log=lambda m: print(f"[generate] {m}", file=sys.stderr),
             **asdict(config)) as llm:
        try:
            results = llm.generate(prompts, params, priorities)
        except InvalidInput as e:
            print(f"[generate] ERROR: {args.input}: {e}", file=sys.stderr)
            return 2
    with args.output.open("w", encoding="utf-8") as out:
        for r in results:
            row = {"prompt": r.prompt, "text": r.text, "finish_reason": r.finish_reason,
                   "num_input_tokens": r.num_input_tokens, "num_output_tokens": r.num_output_tokens, "error": r.error}
            if r.logprobs is not None:  # asked for with "logprobs": N
                row["token_ids"] = r.token_ids
                row["logprobs"] = [{"logprob": lp.logprob, "rank": lp.rank, "top": [list(t) for t in lp.top]}
                                   for lp in r.logprobs]
            out.write(json.dumps(row) + "\n")
    failed = sum(r.error is not None for r in results)
    print(f"[generate] {len(results)} results in {args.output}" + (f", {failed} failed" if failed else ""),
          file=sys.stderr)
    return 0
