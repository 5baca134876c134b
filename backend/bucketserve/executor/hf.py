"""The transformers executor: any Hugging Face causal LM, padded prefill batches, and decode steps
over the running set in length groups of padded KV caches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bucketserve.engine.executor import StepOutput
from bucketserve.engine.memory import KVCostModel
from bucketserve.engine.request import Request
from bucketserve.executor.base import ExecutorBase, eos_ids_of
from bucketserve.executor.device import pick_device, pick_dtype
from bucketserve.executor.padded_kv import PaddedKVCache
from bucketserve.executor.sampler import Sampler

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


class HFExecutor(ExecutorBase):
    """Owns the model and the running set's KV caches.

    The running set is split into at most ``max_decode_groups`` groups of similar length, each with
    its own padded cache and its own forward pass per decode step. A group costs one more read of
    the weights per step; padding costs a read of its keys and values per step. A new prefill batch
    joins the group where it adds the least padding, or starts a group when that padding would cost
    more to read than the weights; groups merge again when that gets cheaper than keeping them apart.
    """

    def __init__(self, model_path: str, tokenizer: Any, device: str = "auto", dtype: str = "auto", num_threads: int = 0,
                 kv_cache_growth: int = 64, max_decode_groups: int = 4, log: Callable[[str], None] = print):
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        super().__init__(pick_device(device))
        self.kv_cache_growth = kv_cache_growth
        chosen = pick_dtype(dtype, self.device)
        kwargs = {} if chosen is None else {"dtype": chosen}
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).to(self.device).eval()
        config = self.model.config
        self.eos_ids = eos_ids_of(self.model.generation_config.eos_token_id, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.max_position_embeddings = int(getattr(config, "max_position_embeddings", 2048))
        self.sampler = Sampler(self.device, self.eos_ids)
        self.max_decode_groups = max_decode_groups
        self.groups: list[DecodeGroup] = []
        self.num_parameters = n_params = sum(p.numel() for p in self.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.group_cost_positions = weight_bytes // self.kv_cost().bytes_per_token
        """One more forward per step reads the weights: as many bytes as this many cached positions."""
        log(f"loaded {config.model_type} ({n_params / 1e6:.1f}M parameters, {self.model.dtype}) "
            f"on {self.device} with {torch.get_num_threads()} threads")

    page_size = 0
    """Padded caches, padded prefill."""
    unified_step = False

    def info(self) -> dict[str, str]:
        return {"executor": "hf", "dtype": str(self.model.dtype).removeprefix("torch."), "device": str(self.device),
                "matmuls": "torch", "max_decode_groups": str(self.max_decode_groups)}

    def allocate(self, budget_bytes: int) -> None:
        """Padded caches grow and shrink with the running set; admission keeps them inside the budget."""
        self.reset()

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

    def prefill_positions(self, lengths: list[int], decode_rows: int = 0) -> int:
        return len(lengths) * max(lengths)  # left-padded to the longest

    @torch.inference_mode()
    def prefill(self, batch: Sequence[Request]) -> StepOutput:
        """Run the batch's prompts, sample each first token, and add the rows to the running set. A
        forward that fails (out of memory, or any error) is retried in halves down to single rows, so
        only the rows that fail alone come back in ``failed``."""
        out = StepOutput()
        self._in_halves("prefill", list(batch), self._prefill_forward, lambda _rows: None, out)
        out.logprobs = self.sampler.take_logprobs()
        return out

    def _prefill_forward(self, batch: list[Request]) -> list[int]:
        """Left-pad the prompts into one batch, run it, and place its rows in a decode group (only once
        the forward has succeeded: a failed one added nothing to the running set)."""
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
        self._place(DecodeGroup(PaddedKVCache(out.past_key_values, mask, self.kv_cache_growth), batch))
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
    def decode(self) -> StepOutput:
        """One token for every running row (each group feeds its rows' last tokens). A forward that
        fails is undone and retried in halves over the same cache, down to single rows: rows that
        fail alone leave the running set and come back in ``failed``; every other row goes on."""
        assert self.groups
        out, positions, padded = StepOutput(), 0, 0
        errors: dict[int, Exception] = {}
        for group in self.groups:
            padded += group.padding()  # the column appended next is real in every row
            positions += group.kv.batch_size * (group.kv.length + 1)
            ran = [(r, t) for r, t in zip(group.rows, self._decode(group.kv, group.rows, errors)) if t is not None]
            out.add([r for r, _ in ran], [t for _, t in ran])
        self.last_decode_positions = (positions, padded)
        if errors:
            for request in [r for r in self.rows if r.id in errors]:
                out.fail([request], errors[request.id])
            self.drop(set(errors))
        out.logprobs = self.sampler.take_logprobs()
        return out

    def _decode(self, kv: PaddedKVCache, rows: list[Request], errors: dict[int, Exception]) -> list[int | None]:
        """One forward for ``rows``: their tokens, None for a row whose own forward failed (in ``errors``)."""
        mark = kv.mark()
        try:
            self._inject("decode", rows)
            return self._decode_forward(kv, rows)
        except Exception as e:
            kv.rollback(mark)  # undo the layers it wrote before failing
            if len(rows) == 1:
                errors[rows[0].id] = e
                return [None]
            self._before_retry(e)
            half = len(rows) // 2
            first, second = kv.split(half)
            tokens = self._decode(first, rows[:half], errors) + self._decode(second, rows[half:], errors)
            kv.advance(1)
            return tokens

    def _decode_forward(self, kv: PaddedKVCache, rows: list[Request]) -> list[int]:
        last = torch.tensor([[r.output_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        position_ids = kv.positions()
        mask = kv.append_column()
        out = self.model(input_ids=last, attention_mask=mask, position_ids=position_ids,
                         past_key_values=kv.cache, use_cache=True)
        return self.sampler(out.logits[:, -1, :], rows)

    def drop(self, ids: set[int]) -> None:
        """Finished or aborted sequences leave; their KV rows are freed and their groups compacted."""
        for group in list(self.groups):
            keep = [i for i, r in enumerate(group.rows) if r.id not in ids]
            if len(keep) == len(group.rows):
                continue
            self._forget([r for r in group.rows if r.id in ids])
            if keep:
                group.kv.select(keep)
                group.rows = [group.rows[i] for i in keep]
            else:
                self.groups.remove(group)
        self._consolidate()

    def _forget(self, rows: list[Request]) -> None:
        for request in rows:
            self.sampler.forget(request.id)

    def reset(self) -> None:
        """Forget the whole running set (after a failed step)."""
        self._forget(self.rows)
        self.groups = []

    def kv_bytes(self) -> int:
        return sum(g.kv.nbytes() for g in self.groups)
