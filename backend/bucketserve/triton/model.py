"""TritonPythonModel: parses requests, hands them to the engine, and returns at once."""

from __future__ import annotations

import json
import os
from typing import Any

import triton_python_backend_utils as pb_utils

from bucketserve.config import EngineConfig
from bucketserve.engine import Engine
from bucketserve.faults import ENV as FAULTS_ENV
from bucketserve.inputs import InvalidInput, check_lengths, check_prompt_bytes, parse_request
from bucketserve.model_builder import default_model_dir, is_built
from bucketserve.request import Request
from bucketserve.runner import Runner
from bucketserve.scheduler import build_scheduler
from bucketserve.triton.interface import INPUT_NAMES, complete
from bucketserve.triton.metrics import EngineMetrics
from bucketserve.triton.responses import FINAL, ResponseThread, error_response

def read_tensors(request: Any) -> dict[str, Any]:
    tensors = {}
    for name in INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors[name] = tensor.as_numpy()
    return tensors


def read_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise InvalidInput(f"request parameters are not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise InvalidInput("request parameters must be a JSON object")
    return params


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config: Any) -> Any:
        """Configs may leave the tensor interface out (the baseline models do): it is filled in here."""
        return complete(auto_complete_model_config)

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("bucketserve needs model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.config = EngineConfig.from_parameters(params)
        path, source = self.config.resolve_model_path(args["model_repository"], str(default_model_dir()))
        if source == "default model" and not is_built(path):
            raise pb_utils.TritonModelException(
                f"default model not found at {path}: run `bucketserve build-model {path}` or set model_path")
        self.logger.log_info(f"[bucketserve] loading {path} ({source})")
        device = self.config.instance_device(args.get("model_instance_kind", ""), args.get("model_instance_device_id", "0"))
        self.runner = Runner(path, device, self.config.dtype, self.config.num_threads,
                             self.config.kv_cache_growth, self.config.max_decode_groups,
                             log=lambda m: self.logger.log_info(f"[bucketserve] {m}"))
        if os.environ.get(FAULTS_ENV):
            self.runner.install_faults(os.environ[FAULTS_ENV])
            self.logger.log_warn(f"[bucketserve] test-only fault injection on: {os.environ[FAULTS_ENV]}")
        self.max_model_len = self.config.max_model_len or self.runner.max_position_embeddings
        free = self.runner.free_device_memory(self.config.max_prefill_tokens, self.max_model_len)
        self.scheduler = build_scheduler(self.config, self.runner.kv_cost().bytes_per_token, free, self.max_model_len)
        budget = self.scheduler.budget
        self.logger.log_info(f"[bucketserve] policy {self.config.scheduler_policy}; KV budget {budget.budget_bytes / 2**20:.0f} MiB "
                             f"({budget.bytes_per_token} bytes per token), N_max {self.scheduler.n_max()} "
                             f"at {self.max_model_len} tokens")
        self.metrics = EngineMetrics(model_config["name"])
        self.engine = Engine(self.runner, self.scheduler, emit=lambda events: self.responses.put(events),
                             log=self.logger.log_error, max_queue_size=self.config.max_queue_size,
                             slo_expiry=self.config.slo_expiry)
        self.responses = ResponseThread(self.runner.tokenizer, self.engine, self.config.cancel_poll_ms / 1000,
                                        log=self.logger.log_error, on_tick=lambda: self.metrics.update(self.engine.monitor))
        self.responses.start()
        self.engine.start()

    def _parse(self, triton_request: Any) -> Request:
        parsed = parse_request(read_tensors(triton_request), read_parameters(triton_request),
                               self.config.default_max_tokens, self.config.default_temperature)
        check_prompt_bytes(parsed.prompt, self.max_model_len, self.runner.max_token_bytes)
        ids = self.runner.tokenize(parsed.prompt)
        check_lengths(len(ids), parsed.sampling.max_tokens, self.max_model_len)
        timeout_us = triton_request.timeout()
        request = Request(parsed.prompt, ids, parsed.sampling, parsed.options, parsed.priority, parsed.slo_ms,
                          timeout_ms=timeout_us / 1000 if timeout_us else None)
        reason = self.scheduler.too_big(request)
        if reason is not None:
            raise InvalidInput(reason)
        return request

    def execute(self, requests: list[Any]) -> None:
        for triton_request in requests:
            sender = triton_request.get_response_sender()
            # only this thread submits, so the queue cannot fill between this check and the submit below
            if self.engine.queue_full():
                sender.send(error_response(
                    f"server is overloaded: {self.engine.waiting()} requests are waiting (max_queue_size "
                    f"{self.config.max_queue_size}); retry later", pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
                continue
            try:
                request = self._parse(triton_request)
            except InvalidInput as e:
                sender.send(error_response(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
                continue
            except Exception as e:  # the one final response is owed even when parsing breaks
                self.logger.log_error(f"[bucketserve] failed to parse a request: {type(e).__name__}: {e}")
                sender.send(error_response(f"failed to parse the request: {e}", pb_utils.TritonError.INTERNAL),
                            flags=FINAL)
                continue
            self.responses.register(request, sender)
            self.engine.submit(request)
        return None

    def finalize(self) -> None:
        self.engine.stop()
        self.responses.stop()
