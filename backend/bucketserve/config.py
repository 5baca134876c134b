"""Engine configuration: every tunable, its default, and its checks, in one place.

Values come from the ``parameters`` of ``config.pbtxt`` (all strings there); ``from_parameters``
converts and validates them so a typo or a bad value fails the model load with a clear message
instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace

from bucketserve.engine.policy import POLICIES

MODEL_PATH_ENV = "BUCKETSERVE_MODEL_PATH"
PARAMS_ENV = "BUCKETSERVE_PARAMS"
"""JSON object of parameters that override config.pbtxt's in every model (`bucketserve serve --param`)."""


class ConfigError(ValueError):
    """A config.pbtxt parameter is unknown or has a bad value."""


def _convert(kind: type, raw: str) -> object:
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    return raw if kind is str else kind(raw)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = ""
    """Hugging Face causal-LM directory. Empty: the default model. Overridden by $BUCKETSERVE_MODEL_PATH
    (what `bucketserve serve --model-path` sets). Relative paths are taken from the model's directory."""
    device: str = "auto"
    """`auto`: the GPU Triton assigned the instance (KIND_GPU), else CUDA if available, else CPU; or
    `cpu`, `cuda`, `cuda:N`."""
    dtype: str = "auto"
    """`auto` (bfloat16 on a GPU, float16 where it has no bfloat16; the checkpoint's dtype on the CPU),
    `float32`, `bfloat16` or `float16`."""
    num_threads: int = 0
    """CPU threads for torch; 0 uses every core."""
    executor: str = "auto"
    """`auto`: our paged executor for Llama, Mistral, Qwen2 and Qwen3 checkpoints with safetensors
    weights (the others load through transformers); `paged` (ours, or the load fails saying why); `hf`
    (transformers, padded KV caches in decode groups)."""
    kv_page_size: int = 128
    """Paged executor: positions per KV page. A sequence holds whole pages, so each wastes less than one. Larger
    pages are read in longer runs (vLLM's CPU backend uses 128): against 16, decode attention took 15% less time
    and the default model's peers workload ran 6-9% faster in process."""
    attention_kernel: str = "auto"
    """Paged executor's CPU kernels (decode attention; prefill attention for head sizes 64 and 128; in float32
    also RMSNorm with the residual add, silu x up and RoPE, fused): `auto` (on the CPU our C++ kernels, built
    on first use, else torch ops), `cpp` (the kernels, or the load fails), `torch` (torch ops everywhere)."""
    max_num_seqs: int = 128
    """Most sequences in the running (decode) set at once (vLLM's CPU server default; the KV budget may allow
    fewer, N_max)."""
    max_prefill_tokens: int = 0
    """Most prompt tokens one step computes: on the paged executor a longer prompt is prefilled in chunks over
    several steps; on the hf executor (padded) it is batch size x longest prompt, and a longer prompt runs alone.
    0: by device, as vLLM's servers choose theirs: 2,048 on the CPU, 4,096 on a GPU; smaller values keep steps
    short (first tokens sooner, steadier TPOT) at some throughput."""
    kv_cache_growth: int = 64
    """hf executor: spare positions each KV slab keeps, so decode steps write in place; regrown when used up."""
    max_decode_groups: int = 4
    """hf executor: most groups the running set is split into by length, each with its own padded KV
    cache and forward pass per decode step; 1 keeps one padded running set."""
    max_model_len: int = 0
    """Longest prompt + output in tokens; 0 takes the model's max_position_embeddings."""
    default_max_tokens: int = 16
    """Output tokens when a request names none (vLLM's default)."""
    default_temperature: float = 1.0
    """Temperature when a request names none (vLLM's default); 0 is greedy."""
    scheduler_policy: str = "bucket"
    """`bucket` (BucketServe), `continuous` (FCFS continuous batching) or `fcfs_static` (batch to completion)."""
    kv_cache_bytes: int = 0
    """M_remaining for the KV cache in bytes; 0 measures it (CUDA: free memory after loading and a
    worst-case forward; CPU: kv_cache_memory_fraction of available RAM)."""
    kv_cache_memory_fraction: float = 0.3
    """On the CPU, the share of available RAM taken as M_remaining when kv_cache_bytes is 0."""
    kv_safety: float = 0.9
    """M_safe = kv_safety x M_remaining: the KV bytes admission never lets the running set exceed."""
    bucket_theta: float = 0.5
    """A bucket splits when more than this share of its requests fall in one half (the paper's theta)."""
    bucket_merge_ratio: float = 0.5
    """Buckets merge back into one when fewer than this x N_max requests wait; 1.0 is the paper's rule."""
    bucket_symmetric_split: bool = False
    """Also split a bucket when its upper half is crowded (the paper only splits for the lower half)."""
    bucket_min_width: int = 16
    """Buckets narrower than twice this many tokens do not split."""
    max_queue_delay_ms: float = 10.0
    """A bucket that cannot fill its batch waits at most this long while the engine is busy."""
    offline_order: str = "sjf"
    """Offline requests (priority 1): `sjf` (shortest job first) or `ljf` (longest job first)."""
    aging_ms: float = 2000.0
    """Each aging_ms a request waits lifts it one class (offline -> online -> urgent): nothing starves."""
    deadline_urgency: float = 0.5
    """A request with slo_ms jumps the queue once this share of its slo_ms has passed."""
    slo_expiry: float = 1.0
    """A request with slo_ms still waiting for its first token after slo_expiry x slo_ms ends with a
    "deadline exceeded" error (UNAVAILABLE) instead of taking compute it can no longer use; 0 never."""
    stream_interval_ms: float = 50.0
    """A streamed request's text waits up to this long to share one response with what follows (its first
    text and its end go at once), like vLLM's stream interval: fewer Triton responses when many streams
    run (each costs the model process an IPC call); 0 sends each step's text as soon as it is ready."""
    stream_response_share: float = 0.2
    """With many streams, their responses are spaced further apart than stream_interval_ms, so that building and
    sending them takes at most this share of the time (measured as it runs); 1 leaves stream_interval_ms alone."""
    cancel_poll_ms: int = 50
    """How often the response thread asks Triton whether clients cancelled their requests; with many streams less
    often, so that polling (an IPC call per stream) takes at most 2% of the time."""
    metrics_interval_ms: int = 500
    """How often the metrics on Triton's port are brought up to date: each value set is an IPC call from the
    model's process, which competes with the engine for the CPU (Prometheus scrapes every few seconds)."""
    max_queue_size: int = 1024
    """Requests waiting for prefill beyond which new ones are refused at once with UNAVAILABLE, so an
    overload costs a retry instead of unbounded memory and latency; 0 means unbounded."""

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "kv_cache_growth", "max_decode_groups", "default_max_tokens",
                    "cancel_poll_ms", "metrics_interval_ms", "kv_page_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_threads", "max_model_len", "max_prefill_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"parameter {name} must be >= 0, got {getattr(self, name)}")
        for name in ("kv_cache_bytes", "max_queue_delay_ms", "max_queue_size", "slo_expiry", "stream_interval_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"parameter {name} must be >= 0, got {getattr(self, name)}")
        for name in ("kv_cache_memory_fraction", "kv_safety", "bucket_theta", "bucket_merge_ratio", "deadline_urgency",
                     "stream_response_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"parameter {name} must be in (0, 1], got {getattr(self, name)}")
        if self.bucket_min_width < 1 or self.aging_ms <= 0:
            raise ConfigError("parameters bucket_min_width and aging_ms must be > 0")
        if self.offline_order not in ("sjf", "ljf"):
            raise ConfigError(f"parameter offline_order must be sjf or ljf, got {self.offline_order!r}")
        if self.default_temperature < 0:
            raise ConfigError(f"parameter default_temperature must be >= 0, got {self.default_temperature}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"parameter dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"parameter device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_kernel not in ("auto", "cpp", "torch"):
            raise ConfigError(f"parameter attention_kernel must be auto, cpp or torch, got {self.attention_kernel!r}")
        if self.executor not in ("auto", "paged", "hf"):
            raise ConfigError(f"parameter executor must be auto, paged or hf, got {self.executor!r}")
        if self.scheduler_policy not in POLICIES:
            raise ConfigError(f"parameter scheduler_policy must be one of {sorted(POLICIES)}, got {self.scheduler_policy!r}")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "EngineConfig":
        """Build from config.pbtxt string parameters; unknown keys are errors, not silently ignored."""
        values: dict[str, object] = {}
        for key, raw in params.items():
            check_known(key)
            kind = type(getattr(cls, key))
            try:
                values[key] = _convert(kind, raw.strip())
            except ValueError:
                raise ConfigError(f"parameter {key} must be {kind.__name__}, got {raw!r}") from None
        return cls(**values)

    @classmethod
    def from_model_config(cls, params: dict[str, str]) -> "EngineConfig":
        """config.pbtxt's parameters, with those of ``$BUCKETSERVE_PARAMS`` in their place."""
        return cls.from_parameters({**params, **parameter_overrides()})

    def on_device(self, device: str) -> "EngineConfig":
        """This config with the defaults that depend on the device (``cpu``, ``cuda:0``...) made concrete."""
        if self.max_prefill_tokens:
            return self
        return replace(self, max_prefill_tokens=2048 if device == "cpu" else 4096)

    def instance_device(self, kind: str, device_id: str) -> str:
        """The device an instance runs on: ``device`` if set, else the GPU Triton gave a KIND_GPU
        instance (``model_instance_kind`` / ``model_instance_device_id``), else ``auto``."""
        if self.device != "auto" or kind != "GPU":
            return self.device
        return f"cuda:{int(device_id)}"

    def resolve_model_path(self, model_dir: str, default_dir: str) -> tuple[str, str]:
        """Return the checkpoint directory and where that choice came from (for the load log)."""
        if os.environ.get(MODEL_PATH_ENV):
            return os.environ[MODEL_PATH_ENV], f"${MODEL_PATH_ENV}"
        if self.model_path:
            return os.path.normpath(os.path.join(model_dir, self.model_path)), "config.pbtxt model_path"
        return default_dir, "default model"


def parameter_overrides() -> dict[str, str]:
    raw = os.environ.get(PARAMS_ENV, "")
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"${PARAMS_ENV} is not valid JSON: {e}") from None
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise ConfigError(f"${PARAMS_ENV} must be a JSON object of strings, got {raw!r}")
    return params


def parse_param(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from the command line; the key must be an engine parameter."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    check_known(key)
    return key, value


def check_known(key: str) -> None:
    known = {f.name for f in fields(EngineConfig)}
    if key not in known:
        raise ConfigError(f"unknown parameter {key!r}; known: {', '.join(sorted(known))}")
