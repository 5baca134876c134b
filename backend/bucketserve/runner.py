"""Runs a Hugging Face causal LM: padded prefill batches and decode steps over the running set."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bucketserve.kv_cache import PaddedKVCache
from bucketserve.memory import KVCostModel
from bucketserve.request import Request
from bucketserve.sampler import Sampler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Runner:
    """Owns the model and the running set's KV cache; rows stay in the order they were added."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", num_threads: int = 0,
                 kv_cache_growth: int = 64, log: Callable[[str], None] = print):
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise FileNotFoundError(f"{model_path} is not a Hugging Face model directory (no config.json)")
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.device = pick_device(device)
        self.kv_cache_growth = kv_cache_growth
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).to(self.device).eval()
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.max_position_embeddings = int(getattr(config, "max_position_embeddings", 2048))
        self.sampler = Sampler(self.device, self.eos_ids)
        self.kv: PaddedKVCache | None = None
        self.rows: list[Request] = []
        self.last_decode_positions = (0, 0)
        """(cached positions, padding positions) the last decode step attended to."""
        n_params = sum(p.numel() for p in self.model.parameters())
        log(f"loaded {config.model_type} ({n_params / 1e6:.1f}M parameters, {self.model.dtype}) "
            f"on {self.device} with {torch.get_num_threads()} threads")

    def kv_cost(self) -> KVCostModel:
        return KVCostModel.from_model_config(self.model.config, self.model.dtype.itemsize)

    @torch.inference_mode()
    def free_device_memory(self, max_prefill_tokens: int, max_len: int) -> int | None:
        """CUDA: bytes free once the weights are loaded, less the activation peak of a worst-case
        prefill (max_prefill_tokens tokens in rows of max_len), which every later prefill needs
        again. None on the CPU."""
        if self.device.type != "cuda":
            return None
        length = min(max_len, max_prefill_tokens)
        rows = max(1, max_prefill_tokens // length)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long, device=self.device)
        self.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return max(0, torch.cuda.mem_get_info(self.device)[0] - peak)

    def tokenize(self, text: str) -> list[int]:
        """Prompt ids with the model's special tokens. Fast tokenizers encode through their Rust
        object directly: ``tokenizer(text)`` may reconfigure it (a mutable borrow) while the
        response thread is decoding with it, which fails with "Already borrowed"."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text).ids
        return self.tokenizer(text).input_ids

    @torch.inference_mode()
    def prefill(self, batch: Sequence[Request]) -> list[int]:
        """Left-pad the prompts into one batch, run it, sample each first token, join the running set."""
        length = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, length - request.prompt_len:] = torch.tensor(request.prompt_ids)
            mask[row, length - request.prompt_len:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        kv = PaddedKVCache(out.past_key_values, mask, self.kv_cache_growth)
        if self.kv is None:  # keep() drops the cache when the running set empties
            self.kv = kv
        else:
            self.kv.merge(kv)
        self.rows.extend(batch)
        return self.sampler(out.logits[:, -1, :], batch)

    @torch.inference_mode()
    def decode(self) -> list[int]:
        """One token for every running row: feed each row's last token."""
        assert self.kv is not None and self.rows
        last = torch.tensor([[r.output_ids[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        positions = self.kv.positions()
        mask = self.kv.append_column()
        self.last_decode_positions = (mask.numel(), mask.numel() - int(mask.sum()))
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                         past_key_values=self.kv.cache, use_cache=True)
        return self.sampler(out.logits[:, -1, :], self.rows)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows of the running set (finished ones leave, their KV is freed)."""
        if len(rows) == len(self.rows):
            return
        kept = set(rows)
        for row, request in enumerate(self.rows):
            if row not in kept:
                self.sampler.forget(request.id)
        self.rows = [self.rows[row] for row in rows]
        if not rows:
            self.kv = None
        else:
            assert self.kv is not None
            self.kv.select(rows)

    def reset(self) -> None:
        """Forget the whole running set (after a failed step)."""
        for request in self.rows:
            self.sampler.forget(request.id)
        self.rows = []
        self.kv = None

    def kv_bytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0
