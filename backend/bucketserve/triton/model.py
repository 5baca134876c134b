"""TritonPythonModel: parses requests, hands them to the engine, and returns at once."""

from __future__ import annotations

import json
import os
from typing import Any

import triton_python_backend_utils as pb_utils

from bucketserve.config import EngineConfig
from bucketserve.engine.request import InvalidInput, Request
from bucketserve.executor.faults import ENV as FAULTS_ENV
from bucketserve.factory import build_engine, load_model
from bucketserve.tools.model_builder import is_built
from bucketserve.triton.inputs import OutputOptions, parse_request
from bucketserve.triton.interface import INPUT_NAMES, complete
from bucketserve.triton.metrics import EngineMetrics
from bucketserve.triton.responses import FINAL, ClientStream, ResponseThread, error_response
from bucketserve_client.defaults import default_model_dir


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
        self.config = EngineConfig.from_model_config(params)
        path, source = self.config.resolve_model_path(args["model_repository"], str(default_model_dir()))
        if source == "default model" and not is_built(path):
            raise pb_utils.TritonModelException(
                f"default model not found at {path}: run `bucketserve build-model {path}` or set model_path")
        self.logger.log_info(f"[bucketserve] loading {path} ({source})")
        device = self.config.instance_device(args.get("model_instance_kind", ""), args.get("model_instance_device_id", "0"))
        faults = os.environ.get(FAULTS_ENV, "")
        if faults:
            self.logger.log_warn(f"[bucketserve] test-only fault injection on: {faults}")
        info = lambda m: self.logger.log_info(f"[bucketserve] {m}")  # noqa: E731
        model = load_model(self.config, path, log=info, device=device, faults=faults)
        self.metrics = EngineMetrics(model_config["name"], {**model.info(), "checkpoint": path},
                                     model.executor.num_parameters)
        self.engine = build_engine(self.config, model, lambda outputs: self.responses.put(outputs), log=info,
                                   log_error=self.logger.log_error)
        self.responses = ResponseThread(self.engine, self.config.cancel_poll_ms / 1000, log=self.logger.log_error,
                                        on_tick=lambda: self.metrics.update(self.engine.monitor),
                                        tick_s=self.config.metrics_interval_ms / 1000,
                                        stream_interval_s=self.config.stream_interval_ms / 1000,
                                        stream_share=self.config.stream_response_share)
        self.responses.start()
        self.engine.start()

    def _parse(self, triton_request: Any) -> tuple[Request, OutputOptions]:
        parsed = parse_request(read_tensors(triton_request), read_parameters(triton_request),
                               self.config.default_max_tokens, self.config.default_temperature)
        timeout_us = triton_request.timeout()
        request = self.engine.make_request(parsed.prompt, parsed.sampling, parsed.priority, parsed.slo_ms,
                                           timeout_ms=timeout_us / 1000 if timeout_us else None,
                                           prompt_ids=parsed.prompt_ids)
        return request, parsed.options

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
                request, options = self._parse(triton_request)
            except InvalidInput as e:
                sender.send(error_response(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
                continue
            except Exception as e:  # the one final response is owed even when parsing breaks
                self.logger.log_error(f"[bucketserve] failed to parse a request: {type(e).__name__}: {e}")
                sender.send(error_response(f"failed to parse the request: {e}", pb_utils.TritonError.INTERNAL),
                            flags=FINAL)
                continue
            self.responses.register(ClientStream(request, options, sender))
            self.engine.submit(request)
        return None

    def finalize(self) -> None:
        self.engine.stop()
        self.responses.stop()
