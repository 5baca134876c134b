"""A model's shape, all a step's cost depends on: from a Hugging Face ``config.json`` or a preset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_len: int

    @property
    def qkv_params(self) -> int:
        """One layer's fused q/k/v projection."""
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer: fused q/k/v, o, fused gate/up, down."""
        return self.qkv_params + self.heads * self.head_dim * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def body_params(self) -> int:
        """The weights every token multiplies through (the LM head only runs for sampled rows)."""
        return self.layers * self.layer_params

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def num_parameters(self) -> int:
        """Body, LM head and embeddings (counted apart: tied or not, the bytes a GPU holds are close)."""
        return self.body_params + 2 * self.head_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_config(cls, path: Path) -> "ModelShape":
        """From a checkpoint directory or its config.json."""
        file = path / "config.json" if path.is_dir() else path
        c = json.loads(file.read_text())
        heads = int(c["num_attention_heads"])
        return cls(name=str(path), layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
                   intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
                   max_len=int(c.get("max_position_embeddings", 4096)))


PRESETS = {
    # from each model's config.json on the Hugging Face hub (meta-llama/...)
    "llama-2-7b": ModelShape("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
    "llama-2-13b": ModelShape("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, 4096),
    "llama-3-8b": ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
}


def model_shape(name: str) -> ModelShape:
    """A preset's name, or a checkpoint directory / config.json path."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a path")
    return ModelShape.from_config(path)
