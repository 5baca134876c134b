"""The CUDA path: run only where torch sees a GPU (skipped elsewhere, so CI on CPU skips them)."""

from __future__ import annotations

import pytest
import torch

from bucketserve.config import EngineConfig
from bucketserve.engine.request import Request
from bucketserve.factory import LoadedModel, build_engine, load_model
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


def load(model_dir, **params) -> LoadedModel:
    return load_model(EngineConfig(**params), str(model_dir), log=lambda _m: None)


def run_engine(model: LoadedModel, requests: list[Request]) -> Collector:
    collector = Collector()
    engine = build_engine(EngineConfig(max_num_seqs=8, kv_cache_bytes=0), model, collector, log=lambda _m: None)
    engine.start()
    for r in requests:
        engine.submit(r)
    collector.wait([r.id for r in requests])
    engine.stop()
    return collector


def test_float32_on_the_gpu_matches_generate(model_dir, cuda_reference):
    model = load(model_dir, device="cuda:0", dtype="float32")
    requests = [make(model, p, max_tokens=12) for p in PROMPTS]
    collector = run_engine(model, requests)
    for r in requests:
        assert collector.tokens[r.id] == cuda_reference(r.prompt_ids, 12), r.prompt[:30]
    assert model.executor.kv_bytes() == 0


def test_auto_dtype_is_bfloat16_on_the_gpu_and_halves_kv_bytes(model_dir):
    model = load(model_dir, device="cuda:0")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert model.executor.model.dtype is expected
    fp32 = load(model_dir, device="cuda:0", dtype="float32")
    assert model.executor.kv_cost().bytes_per_token * 2 == fp32.executor.kv_cost().bytes_per_token
    requests = [make(model, p, max_tokens=8) for p in PROMPTS]
    collector = run_engine(model, requests)
    assert all(len(collector.tokens[r.id]) == 8 for r in requests)


def test_the_kv_budget_comes_from_free_gpu_memory_after_a_worst_case_prefill(model_dir):
    runner = load(model_dir, device="cuda:0").executor
    free_before, total = torch.cuda.mem_get_info(0)
    free = runner.free_device_memory(max_prefill_tokens=8192, max_len=2048)
    assert 0 < free < free_before <= total


def test_a_kind_gpu_instance_gets_the_gpu_triton_names(model_dir):
    device = EngineConfig().instance_device("GPU", str(torch.cuda.device_count() - 1))
    runner = load(model_dir, device=device).executor
    assert runner.device == torch.device(device)
