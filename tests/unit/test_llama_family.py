"""Our paged executor on every architecture it claims: seeded random checkpoints of Llama (with Llama 3
rope scaling, tied embeddings), Mistral (grouped-query attention), Qwen2 (qkv bias) and Qwen3 (q/k norm),
saved and loaded like a user's; greedy tokens must equal transformers' ``generate()`` on each prompt alone."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from bucketserve import LLM, SamplingParams

SHAPE = dict(vocab_size=32_000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)
PROMPTS = ["Hello", "def add(a, b):\n    return a + b\n" * 6, "The quick brown fox jumps over the lazy dog. " * 3]


def llama3(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPE, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **kw)


def mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**SHAPE, num_key_value_heads=1, sliding_window=None, **kw)


def qwen2(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPE, num_key_value_heads=2, **kw)


def qwen3(**kw):
    from transformers import Qwen3Config

    return Qwen3Config(**SHAPE, num_key_value_heads=2, head_dim=32, **kw)


@pytest.fixture(scope="module", params=[llama3, mistral, qwen2, qwen3], ids=lambda f: f.__name__)
def checkpoint(request, model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = request.param(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = AutoModelForCausalLM.from_config(config).eval()
    if config.model_type == "qwen2":  # random init leaves the biases zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    out = tmp_path_factory.mktemp(config.model_type)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out, model


@pytest.mark.parametrize("attention_kernel", ["auto", "torch"])
def test_greedy_tokens_equal_generate(checkpoint, attention_kernel):
    path, reference = checkpoint
    with LLM(str(path), device="cpu", executor="paged", attention_kernel=attention_kernel) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        for out in outs:
            ids = torch.tensor([llm.tokenizer(out.prompt).input_ids])
            with torch.inference_mode():
                expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                              do_sample=False)[0, ids.shape[1]:].tolist()
            assert out.token_ids == expected, (reference.config.model_type, out.prompt[:20])


@pytest.mark.parametrize("attention_kernel", ["cpp", "torch"])
def test_decode_padding_counts_what_attention_reads(model_dir, attention_kernel):
    """The compiled kernel reads only each row's positions (0% padding); torch ops read whole pages."""
    with LLM(str(model_dir), device="cpu", executor="paged", attention_kernel=attention_kernel) as llm:
        llm.generate(["Hello there", "def add(a, b):\n    return a + b\n" * 3],
                     SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
        padding = llm.engine.stats.decode_padding_total
    assert padding == 0.0 if attention_kernel == "cpp" else 0.0 < padding < 1.0


def test_the_last_layer_on_the_kept_rows_alone_gives_their_hidden_states(checkpoint):
    """A prefill samples from each prompt's last position only: the last layer's attention output, o projection
    and MLP run for those rows, and they must come out as they do in the full forward."""
    from transformers import AutoConfig

    from bucketserve.executor.llama import LlamaModel

    path, _ = checkpoint
    model = LlamaModel(str(path), AutoConfig.from_pretrained(path), torch.device("cpu"), torch.float32, onednn=False)

    def attend(_layer, q, k, v, keep):
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                             scale=model.scale, enable_gqa=True)[0].transpose(0, 1)
        return out if keep is None else out.index_select(0, keep)

    ids, positions = torch.randint(4, 1000, (40,), generator=torch.Generator().manual_seed(0)), torch.arange(40)
    keep = torch.tensor([39, 7, 0])
    with torch.inference_mode():
        full = model.forward(ids, positions, 40, attend)
        kept = model.forward(ids, positions, 40, attend, keep)
        none = model.forward(ids, positions, 40, attend, keep[:0])
    torch.testing.assert_close(kept, full.index_select(0, keep))
    assert none.shape == (0, full.shape[1])
