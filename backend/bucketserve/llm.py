"""``LLM``: the engine in process, as vLLM users know it.

    from bucketserve import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", scheduler_policy="bucket")
    for out in llm.generate(["Hello", "Once upon a time"], SamplingParams(max_tokens=32, temperature=0)):
        print(out.text, out.finish_reason)

Engine parameters are the ``config.pbtxt`` parameters (``EngineConfig``), as keyword arguments. The
same factory builds the engine here as inside Triton, so the tokens are the server's.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

from bucketserve.config import EngineConfig
from bucketserve.engine.executor import TokenLogprobs
from bucketserve.engine.outputs import RequestOutput
from bucketserve.engine.request import InvalidInput, Priority, Request, SamplingParams
from bucketserve.factory import build_engine, load_model


@dataclass(frozen=True)
class Completion:
    """One prompt's result."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    """``stop``, ``length``, ``deadline`` or ``error``."""
    num_input_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    """Per token of ``token_ids``, when ``SamplingParams.logprobs`` asked for them."""

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass(frozen=True)
class Delta:
    """What ``LLM.stream`` yields: new text and tokens; the last one carries the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None


Prompt = Union[str, dict]
"""Text, or ``{"prompt_token_ids": [...]}``."""


class LLM:
    def __init__(self, model: str | None = None, log: Any = None, **engine_params: Any):
        from bucketserve.tools.model_builder import ensure_default_model

        self.config = EngineConfig(**engine_params)
        path = model or self.config.model_path or str(ensure_default_model(log or _quiet))
        self._model = load_model(self.config, path, log=log or _quiet)
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.engine = build_engine(self.config, self._model, self._route, log=log or _quiet, log_error=log or print)
        self.engine.start()

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer.tokenizer

    def _route(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            targets = [(self._queues.get(o.request.id), o) for o in outputs]
        for target, output in targets:
            if target is not None:
                target.put(output)

    def _submit(self, request: Request, results: queue.Queue) -> None:
        """Route the request's outputs to ``results`` from before the engine sees it."""
        with self._lock:
            self._queues[request.id] = results
        self.engine.submit(request)

    def _forget(self, request: Request) -> None:
        with self._lock:
            self._queues.pop(request.id, None)

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Priority | Sequence[Priority] = Priority.OFFLINE, use_tqdm: bool = True) -> list[Completion]:
        """Run every prompt to its end; one ``Completion`` per prompt, in order. A prompt is text, or token ids
        as ``{"prompt_token_ids": [...]}`` (as vLLM's ``TokensPrompt``). A prompt the engine refuses raises
        ``InvalidInput`` (naming its index) before any is submitted."""
        from tqdm import tqdm

        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params or SamplingParams()] * len(prompts)
        priorities = priority if isinstance(priority, Sequence) else [priority] * len(prompts)
        if not len(params) == len(priorities) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(params)} sampling params, {len(priorities)} priorities")
        requests = []
        for i, (prompt, sampling, prio) in enumerate(zip(prompts, params, priorities)):
            try:
                if isinstance(prompt, dict):
                    if set(prompt) != {"prompt_token_ids"}:
                        raise InvalidInput(f"a token prompt is {{'prompt_token_ids': [...]}}, got keys {sorted(prompt)}")
                    ids = [int(t) for t in prompt["prompt_token_ids"]]
                    requests.append(self.engine.make_request("", sampling, prio, prompt_ids=ids))
                else:
                    requests.append(self.engine.make_request(prompt, sampling, prio))
            except InvalidInput as e:
                raise InvalidInput(f"prompt index {i}: {e}") from None
        results: queue.Queue = queue.Queue()
        for request in requests:
            self._submit(request, results)
        texts: dict[int, list[str]] = {r.id: [] for r in requests}
        ids: dict[int, list[int]] = {r.id: [] for r in requests}
        logprobs: dict[int, list[TokenLogprobs]] = {r.id: [] for r in requests}
        finals: dict[int, RequestOutput] = {}
        with tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(finals) < len(requests):
                out: RequestOutput = results.get()
                texts[out.request.id].append(out.text)
                ids[out.request.id] += out.token_ids
                logprobs[out.request.id] += out.logprobs
                if out.finished:
                    finals[out.request.id] = out
                    self._forget(out.request)
                    bar.update(1)
        return [Completion(r.prompt, "".join(texts[r.id]), ids[r.id], finals[r.id].finish_reason.value,
                           r.prompt_len, finals[r.id].error,
                           logprobs[r.id] if r.sampling.logprobs is not None else None) for r in requests]

    def stream(self, prompt: str, sampling_params: SamplingParams | None = None,
               priority: Priority = Priority.ONLINE, slo_ms: int | None = None) -> Iterator[Delta]:
        """Yield text as it is generated; leaving the loop early cancels the request."""
        request = self.engine.make_request(prompt, sampling_params or SamplingParams(), priority, slo_ms)
        outputs: queue.Queue = queue.Queue()
        self._submit(request, outputs)
        finished = False
        try:
            while not finished:
                out: RequestOutput = outputs.get()
                finished = out.finished
                if out.text or out.token_ids or finished:
                    yield Delta(out.text, out.token_ids, out.finish_reason.value if finished else None, out.error,
                                out.logprobs if request.sampling.logprobs is not None else None)
        finally:
            if not finished:
                self.engine.abort(request.id)
            self._forget(request)

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _quiet(_message: str) -> None:
    pass
