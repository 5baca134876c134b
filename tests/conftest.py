"""Shared fixtures: the default model, built once per test session through the real builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketserve.tools import model_builder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_builder.build(tmp_path_factory.mktemp("model") / "tiny-llama", log=lambda _m: None)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir: Path):
    """Greedy tokens from transformers' own generate(), one prompt at a time: the ground truth."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate
