"""One way to build an engine, used by every front end: the Triton model, ``LLM``, ``bench-policies``
and the tests. Loading the model (``load_model``) is separate from building an engine over it
(``build_engine``), so one loaded model can serve several engines in turn (the policy benchmark)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from bucketserve.config import EngineConfig
from bucketserve.engine.engine import Engine, OnOutput
from bucketserve.engine.scheduler import build_scheduler
from bucketserve.engine.tokenizer import PromptTokenizer
from bucketserve.engine.executor import Executor
from bucketserve.launcher import allocator

Log = Callable[[str], None]
T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` on a thread of its own that ends when it returns (its exception re-raised here).

    Loading and allocating run torch's parallel ops, and OpenMP keeps a team of worker threads for every thread
    that ever ran one, for as long as that thread lives. With the caller's team (Triton's stub thread, the
    ``LLM`` user's thread) kept beside the engine thread's, libgomp counts more threads than cores and lets
    the engine's workers spin only ~100 times before they sleep: each of a step's few hundred parallel
    regions then waits for a worker to wake. Measured on 2 cores: small matmuls with 40 us of Python
    between them took 1.7x as long (120,000 context switches instead of 350). A thread that ends takes its
    team with it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bucketserve-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()  # leaving the block joins the thread: it has ended


@dataclass
class LoadedModel:
    path: str
    tokenizer: PromptTokenizer
    executor: Executor

    def info(self) -> dict[str, str]:
        """What the model runs on, for metrics labels and reports: the executor's facts and the malloc."""
        return {**self.executor.info(), "malloc": allocator.name()}


def make_executor(config: EngineConfig, model_path: str, tokenizer: object, device: str, log: Log) -> Executor:
    """Our paged executor where it runs the checkpoint (``executor`` auto or paged), else transformers'."""
    from transformers import AutoConfig

    from bucketserve.executor.llama import unsupported

    if config.executor != "hf":
        checkpoint = AutoConfig.from_pretrained(model_path)
        why_not = unsupported(checkpoint, model_path)
        if why_not is None:
            from bucketserve.executor.paged import PagedExecutor

            return PagedExecutor(model_path, checkpoint, tokenizer, device, config.dtype, config.num_threads,
                                 config.kv_page_size, config.attention_kernel, log=log)
        if config.executor == "paged":
            raise ValueError(f"executor paged cannot run {model_path}: {why_not}")
        log(f"the paged executor cannot run this checkpoint ({why_not}); loading it through transformers")
    from bucketserve.executor.hf import HFExecutor

    return HFExecutor(model_path, tokenizer, device, config.dtype, config.num_threads, config.kv_cache_growth,
                      config.max_decode_groups, log=log)


def load_model(config: EngineConfig, model_path: str, log: Log = print, device: str | None = None,
               faults: str = "") -> LoadedModel:
    """Tokenizer and executor for a Hugging Face checkpoint directory. ``device`` overrides
    ``config.device`` (Triton's KIND_GPU placement); ``faults`` is the test-only fault plan."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"{model_path} is not a Hugging Face model directory (no config.json)")
    log(f"malloc: {allocator.describe()}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    executor = on_passing_thread(make_executor, config, model_path, tokenizer, device or config.device, log)
    if faults:
        executor.install_faults(faults)
    return LoadedModel(model_path, PromptTokenizer(tokenizer), executor)


def build_engine(config: EngineConfig, model: LoadedModel, on_output: OnOutput, log: Log = print,
                 log_error: Log | None = None) -> Engine:
    """An engine (not started) over ``model`` with the scheduler, KV budget and limits ``config`` names.
    ``log`` takes what it set up; ``log_error`` (default ``log``) the engine's failures."""
    executor = model.executor
    config = config.on_device(executor.info()["device"])
    max_len = config.max_model_len or executor.max_position_embeddings
    free = executor.free_device_memory(config.max_prefill_tokens, max_len)
    scheduler = build_scheduler(config, executor.kv_cost().bytes_per_token, free, max_len, executor.page_size,
                                executor.unified_step)
    budget = scheduler.budget
    on_passing_thread(executor.allocate, budget.budget_bytes)
    log(f"policy {config.scheduler_policy}; KV budget {budget.budget_bytes / 2**20:.0f} MiB "
        f"({budget.bytes_per_token} bytes per token), N_max {scheduler.n_max()} at {max_len} tokens; prefill "
        f"batches of up to {config.max_prefill_tokens} tokens")
    return Engine(executor, scheduler, model.tokenizer, on_output, log=log_error or log, max_queue_size=config.max_queue_size,
                  slo_expiry=config.slo_expiry)
