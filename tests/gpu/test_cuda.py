"""The CUDA path: run only where torch sees a GPU (skipped elsewhere, so CI on CPU skips them)."""

from __future__ import annotations

import pytest
import torch

from bucketserve.config import EngineConfig
from bucketserve.request import Request
from bucketserve.runner import Runner
from bucketserve.scheduler import build_scheduler
from tests.unit.test_engine import PROMPTS, Collector, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def cuda_reference(model_dir):
    """Greedy tokens from transformers' generate() on the GPU in float32, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda:0").eval()

    def generate(prompt_ids: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt_ids], device="cuda:0")
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


def run_engine(runner: Runner, requests: list[Request]) -> Collector:
    from bucketserve.engine import Engine

    collector = Collector()
    config = EngineConfig(max_num_seqs=8, kv_cache_bytes=0)
    free = runner.free_device_memory(config.max_prefill_tokens, runner.max_position_embeddings)
    scheduler = build_scheduler(config, runner.kv_cost().bytes_per_token, free, runner.max_position_embeddings)
    engine = Engine(runner, scheduler, collector)
    engine.start()
    for r in requests:
        engine.submit(r)
    collector.wait([r.id for r in requests])
    engine.stop()
    return collector


def test_float32_on_the_gpu_matches_generate(model_dir, cuda_reference):
    runner = Runner(str(model_dir), device="cuda:0", dtype="float32", log=lambda _m: None)
    requests = [make(runner, p, max_tokens=12) for p in PROMPTS]
    collector = run_engine(runner, requests)
    for r in requests:
        assert collector.tokens[r.id] == cuda_reference(r.prompt_ids, 12), r.prompt[:30]
    assert runner.kv_bytes() == 0


def test_auto_dtype_is_bfloat16_on_the_gpu_and_halves_kv_bytes(model_dir):
    runner = Runner(str(model_dir), device="cuda:0", log=lambda _m: None)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert runner.model.dtype is expected
    fp32 = Runner(str(model_dir), device="cuda:0", dtype="float32", log=lambda _m: None)
    assert runner.kv_cost().bytes_per_token * 2 == fp32.kv_cost().bytes_per_token
    requests = [make(runner, p, max_tokens=8) for p in PROMPTS]
    collector = run_engine(runner, requests)
    assert all(len(collector.tokens[r.id]) == 8 for r in requests)


def test_the_kv_budget_comes_from_free_gpu_memory_after_a_worst_case_prefill(model_dir):
    runner = Runner(str(model_dir), device="cuda:0", log=lambda _m: None)
    free_before, total = torch.cuda.mem_get_info(0)
    free = runner.free_device_memory(max_prefill_tokens=8192, max_len=2048)
    assert 0 < free < free_before <= total


def test_a_kind_gpu_instance_gets_the_gpu_triton_names(model_dir):
    device = EngineConfig().instance_device("GPU", str(torch.cuda.device_count() - 1))
    runner = Runner(str(model_dir), device=device, log=lambda _m: None)
    assert runner.device == torch.device(device)
