"""Our forward pass for the Llama family: Llama 2/3 (rope scaling as in their configs), Mistral, Qwen2 (qkv
bias), Qwen3 (q/k norm); grouped-query attention, tied or untied embeddings.

Weights come from the checkpoint's safetensors (never a pickle); q/k/v and gate/up are fused into one
matmul each. The forward runs on packed tokens ``[tokens, hidden]`` with no batch dimension and no
padding; attention is a callback, so prefill (packed causal) and decode (paged) share everything else.
The arithmetic follows transformers' own modules (float32 RMSNorm, rotate-half RoPE from the model's
rotary embedding), so greedy tokens match ``generate()``. On the CPU in float32 the elementwise steps run
as fused kernels (``kernels.py``): RMSNorm with the residual add before it, silu x up, RoPE in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bucketserve.executor.linear import Linear

FAMILY = ("llama", "mistral", "qwen2", "qwen3")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(layer, q [tokens, heads, dim], k, v [tokens, kv_heads, dim], keep) -> attention output [tokens, heads, dim], or
only the ``keep`` rows' (in that order) where ``keep`` is given; every token's keys and values are stored either way."""


def unsupported(config: Any, model_path: str) -> str | None:
    """Why our forward cannot run this checkpoint (None: it can)."""
    if config.model_type not in FAMILY:
        return f"model type {config.model_type!r} is not one of {FAMILY}"
    sliding = getattr(config, "sliding_window", None)
    if sliding and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if not safetensors_files(model_path):
        return "no safetensors weights"
    return None


def safetensors_files(model_path: str) -> list[Path]:
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({root / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaLayer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, onednn: bool):
        def bias(name: str) -> torch.Tensor | None:
            return w.get(f"{prefix}{name}.bias")

        def fused(names: list[str]) -> Linear:
            biases = [bias(n) for n in names]
            joint_bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros_like(w[f"{prefix}{n}.weight"][:, 0]) for b, n in zip(biases, names)])
            return Linear(torch.cat([w[f"{prefix}{n}.weight"] for n in names]), joint_bias, onednn)

        self.qkv = fused(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
        self.o = Linear(w[f"{prefix}self_attn.o_proj.weight"], bias("self_attn.o_proj"), onednn)
        self.gate_up = fused(["mlp.gate_proj", "mlp.up_proj"])
        self.down = Linear(w[f"{prefix}mlp.down_proj.weight"], bias("mlp.down_proj"), onednn)
        self.input_norm = w[f"{prefix}input_layernorm.weight"]
        self.post_norm = w[f"{prefix}post_attention_layernorm.weight"]
        self.q_norm = w.get(f"{prefix}self_attn.q_norm.weight")
        self.k_norm = w.get(f"{prefix}self_attn.k_norm.weight")


class LlamaModel:
    def __init__(self, model_path: str, config: Any, device: torch.device, dtype: torch.dtype, onednn: bool,
                 kernels: Any = None):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.device, self.dtype = device, dtype
        self.kernels = kernels if device.type == "cpu" and dtype == torch.float32 else None
        """The compiled CPU kernels for the elementwise steps (float32 only), or None: torch ops."""
        weights: dict[str, torch.Tensor] = {}
        for file in safetensors_files(model_path):
            weights.update({k: v.to(device=device, dtype=dtype) for k, v in load_file(str(file)).items()})
        self.embed = weights["model.embed_tokens.weight"]
        head = weights.get("lm_head.weight")
        if head is None or getattr(config, "tie_word_embeddings", False):
            head = self.embed
        self.lm_head = Linear(head, None, onednn)
        self.norm = weights["model.norm.weight"]
        self.layers = [LlamaLayer(weights, f"model.layers.{i}.", onednn) for i in range(int(config.num_hidden_layers))]
        unique = {id(t): t for t in weights.values() if t is not weights.get("lm_head.weight") or head is not self.embed}
        self.weight_bytes = sum(t.nbytes for t in unique.values())
        self.num_parameters = sum(t.numel() for t in unique.values())
        rope = LlamaRotaryEmbedding(config)
        self.inv_freq = rope.inv_freq.float().to(device)
        self.rope_scaling = float(rope.attention_scaling)
        self._rope_cos = self._rope_sin = torch.empty(0, 2 * len(self.inv_freq), dtype=dtype, device=device)

    def rope(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[tokens, 1, head_dim]`` at these positions (all below ``end``), as the model's rotary
        embedding makes them: rows of a table computed once (per position, so a row never depends on its batch),
        which grows when a longer context comes."""
        if end > self._rope_cos.shape[0]:
            table = torch.arange(max(end, 2 * self._rope_cos.shape[0]), device=self.device).float()
            freqs = table[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cos = (emb.cos() * self.rope_scaling).to(self.dtype)
            self._rope_sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return self._rope_cos[positions][:, None, :], self._rope_sin[positions][:, None, :]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, end: int, attend: Attend,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[tokens, hidden]`` (before the final norm) of packed tokens at ``positions`` (all below
        ``end``). ``keep``: the rows whose hidden states are wanted (all if None), in the order returned. A prompt
        needs only its last position's: the last layer computes keys and values for every row, but its attention
        output, o projection and MLP for the ``keep`` rows alone (a 2,048-token prefill of an 8-layer model
        saves ~1/9 of its matmuls)."""
        cos, sin = self.rope(positions, end)
        x = F.embedding(ids, self.embed)
        h = self.add_norm(x, None, self.layers[0].input_norm)
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, layer.qkv(h), cos, sin)
            final = keep if i + 1 == len(self.layers) else None
            attended = attend(i, q, k, v, final)
            if final is not None:
                x = x.index_select(0, final)
                if not len(final):
                    return x
            h = self.add_norm(x, layer.o(attended.reshape(-1, self.heads * self.head_dim)), layer.post_norm)
            delta = layer.down(self.silu_mul(layer.gate_up(h)))
            if i + 1 < len(self.layers):
                h = self.add_norm(x, delta, self.layers[i + 1].input_norm)
            else:
                x += delta
        return x

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """``x += delta`` (the residual stream, in place), then RMSNorm of ``x``."""
        if self.kernels is not None:
            return self.kernels.rms_norm(x, delta, weight, self.eps)
        if delta is not None:
            x += delta
        return rms_norm(x, weight, self.eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def qkv(self, layer: LlamaLayer, qkv: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[tokens, heads, dim]``, k and v ``[tokens, kv_heads, dim]`` from the fused projection, RoPE applied."""
        fused = self.kernels is not None and layer.q_norm is None
        if fused:  # in place on the q and k heads, before they are split into views
            tokens = qkv.shape[0]
            self.kernels.rope_(qkv, cos.view(tokens, -1), sin.view(tokens, -1), self.heads + self.kv_heads, self.head_dim)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if fused:
            return q, k, v
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(hidden, self.norm, self.eps))
