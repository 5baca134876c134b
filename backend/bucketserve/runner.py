"""Runs a Hugging Face causal LM: padded prefill batches and decode steps over the running set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bucketserve.kv_cache import PaddedKVCache
from bucketserve.memory import KVCostModel
from bucketserve.request import Request
from bucketserve.sampler import Sampler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecodeGroup:
    """Running sequences that share one padded KV cache and one forward pass per decode step."""

    kv: PaddedKVCache
    rows: list[Request]

    def real_positions(self) -> int:
        # the cache holds each prompt and every output token but the newest (fed next step)
        return sum(r.prompt_len + max(0, r.num_output - 1) for r in self.rows)

    def padding(self) -> int:
        return len(self.rows) * self.kv.length - self.real_positions()


def merged_padding(a: DecodeGroup, b: DecodeGroup) -> int:
    """Padding positions that merging ``a`` and ``b`` would add: the shorter group's rows widen to the
    longer one's length (real positions cancel out)."""
    rows = len(a.rows) + len(b.rows)
    return rows * max(a.kv.length, b.kv.length) - len(a.rows) * a.kv.length - len(b.rows) * b.kv.length


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Runner:
    """Owns the model and the running set's KV caches.

    The running set is split into at most ``max_decode_groups`` groups of similar length, each with
    its own padded cache and its own forward pass per decode step. A group costs one more read of
    the weights per step; padding costs a read of its keys and values per step. A new prefill batch
    joins the group where it adds the least padding, or starts a group when that padding would cost
    more to read than the weights; groups merge again when that gets cheaper than keeping them apart.
    """

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", num_threads: int = 0,
                 kv_cache_growth: int = 64, max_decode_groups: int = 4, log: Callable[[str], None] = print):
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
        # no token stands for more bytes of text than its own spelling takes: an upper bound per token
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in self.tokenizer.get_vocab()), default=1)
        self.sampler = Sampler(self.device, self.eos_ids)
        self.max_decode_groups = max_decode_groups
        self.groups: list[DecodeGroup] = []
        self.last_decode_positions = (0, 0)
        """(cached positions, padding positions) the last decode step attended to."""
        n_params = sum(p.numel() for p in self.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.group_cost_positions = weight_bytes // self.kv_cost().bytes_per_token
        """One more forward per step reads the weights: as many bytes as this many cached positions."""
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
        tokens = self.sampler(out.logits[:, -1, :], batch)
        self._place(DecodeGroup(PaddedKVCache(out.past_key_values, mask, self.kv_cache_growth), list(batch)))
        return tokens

    def _place(self, new: DecodeGroup) -> None:
        """Put newly prefilled rows where they cost least (see the class docstring)."""
        best = min(self.groups, key=lambda g: merged_padding(g, new), default=None)
        if best is not None and (len(self.groups) >= self.max_decode_groups
                                 or merged_padding(best, new) <= self.group_cost_positions):
            self._merge(best, new)
        else:
            self.groups.append(new)
        self._consolidate()

    def _merge(self, into: DecodeGroup, other: DecodeGroup) -> None:
        into.kv.merge(other.kv)
        into.rows.extend(other.rows)
        if other in self.groups:
            self.groups.remove(other)

    def _consolidate(self) -> None:
        """Merge the cheapest pair of groups while merging costs less than a forward pass."""
        while len(self.groups) > 1:
            pairs = [(merged_padding(a, b), a, b) for i, a in enumerate(self.groups) for b in self.groups[i + 1:]]
            cost, a, b = min(pairs, key=lambda p: p[0])
            if cost > self.group_cost_positions:
                return
            self._merge(a, b)

    @property
    def rows(self) -> list[Request]:
        """Every running sequence, in the order ``decode`` returns tokens."""
        return [r for g in self.groups for r in g.rows]

    @torch.inference_mode()
    def decode(self) -> tuple[list[Request], list[int]]:
        """One token for every running row (each group feeds its rows' last tokens); returns the
        rows and their tokens in the same order."""
        assert self.groups
        rows, tokens, positions, padded = [], [], 0, 0
        for group in self.groups:
            last = torch.tensor([[r.output_ids[-1]] for r in group.rows], dtype=torch.long, device=self.device)
            position_ids = group.kv.positions()
            padded += group.padding()  # the column appended next is real in every row
            mask = group.kv.append_column()
            positions += mask.numel()
            out = self.model(input_ids=last, attention_mask=mask, position_ids=position_ids,
                             past_key_values=group.kv.cache, use_cache=True)
            rows += group.rows
            tokens += self.sampler(out.logits[:, -1, :], group.rows)
        self.last_decode_positions = (positions, padded)
        return rows, tokens

    def drop(self, ids: set[int]) -> None:
        """Finished or aborted sequences leave; their KV rows are freed and their groups compacted."""
        for group in list(self.groups):
            keep = [i for i, r in enumerate(group.rows) if r.id not in ids]
            if len(keep) == len(group.rows):
                continue
            for r in group.rows:
                if r.id in ids:
                    self.sampler.forget(r.id)
            if keep:
                group.kv.select(keep)
                group.rows = [group.rows[i] for i in keep]
            else:
                self.groups.remove(group)
        self._consolidate()

    def reset(self) -> None:
        """Forget the whole running set (after a failed step)."""
        for request in self.rows:
            self.sampler.forget(request.id)
        self.groups = []

    def kv_bytes(self) -> int:
        return sum(g.kv.nbytes() for g in self.groups)
