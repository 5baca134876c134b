"""The paged executor: our Llama-family forward over a paged KV pool, with packed prefill and decode
attention over each row's own pages (no padded batch anywhere).

A prefill batch runs as one packed forward; its rows join the running set by taking pool pages, and a
finished row leaves by giving its pages back: nothing is copied. A forward that fails leaves the pool
as it was (a failed prefill frees the pages it took; a failed decode step advances no row), so the
retry in halves sees the same state the failed forward did.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from bucketserve.engine.executor import StepOutput
from bucketserve.engine.memory import KVCostModel
from bucketserve.engine.request import Request
from bucketserve.executor.attention import (DecodeLayout, PrefillLayout, decode_attention, prefill_attention,
                                            prefill_kernel_covers)
from bucketserve.executor.base import ExecutorBase, eos_ids_of
from bucketserve.executor.device import pick_device, pick_dtype
from bucketserve.executor.kernels import cpu_kernels
from bucketserve.executor.kv_cache import PagedKVPool
from bucketserve.executor.linear import onednn_works, padded_rows
from bucketserve.executor.llama import LlamaModel
from bucketserve.executor.sampler import Sampler


class PagedExecutor(ExecutorBase):
    def __init__(self, model_path: str, config: Any, tokenizer: Any, device: str = "auto", dtype: str = "auto",
                 num_threads: int = 0, page_size: int = 128, attention_kernel: str = "auto",
                 log: Callable[[str], None] = print):
        from transformers import GenerationConfig

        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        super().__init__(pick_device(device))
        chosen = pick_dtype(dtype, self.device) or getattr(config, "dtype", None) or torch.float32
        chosen = getattr(torch, chosen) if isinstance(chosen, str) else chosen
        self.onednn = onednn_works(self.device, chosen)
        self.kernel = None
        """The compiled CPU kernels: decode attention, and in float32 the fused elementwise steps."""
        if attention_kernel == "cpp" or (attention_kernel == "auto" and self.device.type == "cpu"):
            self.kernel = cpu_kernels(log)
            if self.kernel is None and attention_kernel == "cpp":
                raise RuntimeError("attention_kernel cpp: the CPU kernels could not be built")
        self.model = LlamaModel(model_path, config, self.device, chosen, self.onednn, self.kernel)
        try:
            generation_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            generation_eos = getattr(config, "eos_token_id", None)
        self.eos_ids = eos_ids_of(generation_eos, tokenizer)
        self.max_position_embeddings = int(getattr(config, "max_position_embeddings", 2048))
        self.page_size = page_size
        self.sampler = Sampler(self.device, self.eos_ids)
        self.unified_step = True
        self.pool: PagedKVPool | None = None
        self.rows: list[Request] = []
        """The running set, in the order ``decode`` returns tokens."""
        matmuls = "oneDNN prepacked" if self.onednn else "F.linear"
        attention = "compiled CPU kernel" if self.kernel is not None else "torch ops"
        prefill = "compiled CPU kernel" if self._prefill_kernel() else "torch SDPA"
        elementwise = "fused CPU kernels" if self.model.kernels is not None else "torch ops"
        log(f"loaded {config.model_type} ({self.model.num_parameters / 1e6:.1f}M parameters, {chosen}) on "
            f"{self.device} with {torch.get_num_threads()} threads: paged executor (pages of {page_size}, "
            f"{matmuls} matmuls, decode attention on {attention}, prefill attention on {prefill}, elementwise "
            f"steps on {elementwise})")

    def _prefill_kernel(self) -> bool:
        return self.kernel is not None and prefill_kernel_covers(self.model.dtype, self.model.head_dim)

    @property
    def num_parameters(self) -> int:
        return self.model.num_parameters

    def info(self) -> dict[str, str]:
        return {"executor": "paged", "dtype": str(self.model.dtype).removeprefix("torch."), "device": str(self.device),
                "matmuls": "onednn" if self.onednn else "torch", "kv_page_size": str(self.page_size),
                "decode_attention": "cpp" if self.kernel is not None else "torch",
                "prefill_attention": "cpp" if self._prefill_kernel() else "sdpa"}

    def kv_cost(self) -> KVCostModel:
        m = self.model
        return KVCostModel(len(m.layers), m.kv_heads, m.head_dim, m.dtype.itemsize)

    def allocate(self, budget_bytes: int) -> None:
        """Size the pool to the KV budget (M_safe): admission never reserves more pages than it has."""
        per_page = self.kv_cost().bytes_per_token * self.page_size
        m = self.model
        self.reset()
        self.pool = PagedKVPool(len(m.layers), m.kv_heads, m.head_dim, self.page_size,
                                max(1, budget_bytes // per_page), m.dtype, self.device, self.kernel)

    @torch.inference_mode()
    def free_device_memory(self, max_prefill_tokens: int, max_len: int) -> int | None:
        """CUDA: bytes free once the weights are loaded, less the activation peak of a worst-case packed
        prefill of ``max_prefill_tokens`` tokens. None on the CPU."""
        if self.device.type != "cuda":
            return None
        n = min(max_len, max_prefill_tokens)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(max_prefill_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(max_prefill_tokens, device=self.device) % n
        lengths = [n] * (max_prefill_tokens // n) + ([max_prefill_tokens % n] if max_prefill_tokens % n else [])
        scale = self.model.scale
        layout = PrefillLayout.build([[]] * len(lengths), lengths, [0] * len(lengths), self.device)
        hidden = self.model.forward(ids, positions, n,
                                    lambda _i, q, k, v, _keep: prefill_attention(q, k, v, layout, None, None, scale))
        self.model.logits(hidden[-len(lengths):])
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return max(0, torch.cuda.mem_get_info(self.device)[0] - peak)

    def prefill_positions(self, lengths: list[int], decode_rows: int = 0) -> int:
        return padded_rows(sum(lengths) + decode_rows) - decode_rows if self.onednn else sum(lengths)

    @torch.inference_mode()
    def prefill(self, batch: Sequence[Request]) -> StepOutput:
        """Run the batch's prompt chunks packed; a request whose prompt is complete gets its first token and joins
        the running set."""
        return self._apart(list(batch), [])

    @torch.inference_mode()
    def decode(self) -> StepOutput:
        """One token for every running row. A forward that fails is retried in halves down to single rows:
        rows that fail alone leave the running set and come back in ``failed``; every other row goes on."""
        assert self.pool is not None and self.rows
        return self._apart([], list(self.rows))

    @torch.inference_mode()
    def step(self, batch: Sequence[Request]) -> StepOutput:
        """The batch's prompt chunks and one token for every row running before it, as one forward: the decode
        rows ride along the prefill's matmuls instead of reading every weight again. If that forward fails, the
        two run again apart, each retried in halves as ``prefill`` and ``decode`` do."""
        assert self.pool is not None
        batch, rows = list(batch), list(self.rows)
        self.last_decode_positions = (0, 0)
        if batch and rows:
            try:
                self._inject("prefill", batch)
                self._inject("decode", rows)
                out = StepOutput()
                out.add(rows + batch, self._forward(batch, rows))
                out.logprobs = self.sampler.take_logprobs()
                return out
            except Exception as e:
                self._undo(batch)
                self._before_retry(e)
                self.sampler.take_logprobs()
        return self._apart(batch, rows)

    def _apart(self, batch: list[Request], rows: list[Request]) -> StepOutput:
        """The batch's prefill, then the rows' decode, each as its own forward retried in halves."""
        out = StepOutput()
        self.last_decode_positions = (0, 0)
        if batch:
            self._in_halves("prefill", batch, lambda b: self._forward(b, []), self._undo, out)
        if rows:
            decoded = len(out.failed)
            self._in_halves("decode", rows, lambda r: self._forward([], r), lambda _rows: None, out)
            if len(out.failed) > decoded:
                self.drop({r.id for r, _ in out.failed[decoded:]})
        out.logprobs = self.sampler.take_logprobs()
        return out

    def _forward(self, batch: list[Request], rows: list[Request]) -> list[int | None]:
        """One forward over the running ``rows`` (one new position each) and the ``batch``'s prompt chunks (each
        request's positions ``prefilled..prefill_end``), packed in that order. Returns a token per row, then per
        request of the batch (None where its prompt is not complete yet). Only when it succeeds does any row
        advance: a failed forward leaves the lengths as they were, and the caller gives back the batch's new pages."""
        pool, dev = self.pool, self.device
        assert pool is not None
        tables, pages, offsets = [], [], []
        for request in rows:  # each row writes its next position, the length it has so far
            table = pool.reserve(request.id, pool.tables[request.id].length + 1)
            tables.append((table.pages, table.length + 1))
            page, offset = pool.slots(request.id, table.length, table.length + 1)
            pages += page
            offsets += offset
        lengths, contexts, prefill_tables = [], [], []
        for request in batch:
            start, end = request.prefilled, request.prefill_end
            prefill_tables.append(pool.reserve(request.id, end).pages)
            page, offset = pool.slots(request.id, start, end)
            pages += page
            offsets += offset
            lengths.append(end - start)
            contexts.append(start)
        decoding, prefilling = len(rows), sum(lengths)
        # rows of zeros after a prefill, so the matmuls see a familiar shape (a decode step's sizes repeat by themselves)
        extra = padded_rows(decoding + prefilling) - decoding - prefilling if batch and self.onednn else 0
        ids = torch.tensor([r.output_ids[-1] for r in rows]
                           + [t for r in batch for t in r.prompt_ids[r.prefilled:r.prefill_end]] + [0] * extra, device=dev)
        positions = torch.tensor([n - 1 for _, n in tables] + [p for r in batch for p in range(r.prefilled, r.prefill_end)]
                                 + [0] * extra, device=dev)
        slots = pool.slot_index(pages, offsets)
        layout = DecodeLayout.build(tables, self.page_size, dev, gather=self.kernel is None) if rows else None
        chunks = PrefillLayout.build(prefill_tables, lengths, contexts, dev) if batch else None
        complete, last, offset = [], list(range(decoding)), decoding  # the rows whose logits are sampled
        sampled_tables = list(tables)
        for request, table, n in zip(batch, prefill_tables, lengths):
            offset += n
            if request.prefill_end == request.prompt_len:
                complete.append(request)
                last.append(offset - 1)
                sampled_tables.append((table, request.prefill_end))
        # with prompt tokens in the step, the last layer attends from the sampled rows alone, each as a decode row
        # over its pages (a prompt's last position included)
        keep = torch.tensor(last, dtype=torch.long, device=dev) if batch else None
        final = (DecodeLayout.build(sampled_tables, self.page_size, dev, gather=self.kernel is None)
                 if batch and last else None)
        scale = self.model.scale

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   kept: torch.Tensor | None) -> torch.Tensor:
            keys, values = pool.keys[layer], pool.values[layer]
            pool.write(layer, slots, k[:decoding + prefilling], v[:decoding + prefilling])
            if kept is not None:
                return q[:0] if final is None else decode_attention(q.index_select(0, kept), keys, values, final, scale,
                                                                    self.kernel)
            parts = []
            if layout is not None:
                parts.append(decode_attention(q[:decoding], keys, values, layout, scale, self.kernel))
            if chunks is not None:
                parts.append(prefill_attention(q[decoding:], k[decoding:], v[decoding:], chunks, keys, values, scale,
                                               self.kernel))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        end = max([n for _, n in tables] + [r.prefill_end for r in batch])
        hidden = self.model.forward(ids, positions, end, attend, keep)
        sampled = self.sampler(self.model.logits(hidden), rows + complete) if last else []
        for request in rows:  # only now: a failed forward advanced no row
            pool.tables[request.id].length += 1
        for request in batch:
            pool.tables[request.id].length = request.prefill_end
        self.rows += complete
        if rows:
            # the compiled kernel reads each row's positions only; the torch ops read whole pages, the last one's tail masked
            assert layout is not None
            read = layout.real_positions if self.kernel is not None else layout.read_positions
            done, padded = self.last_decode_positions
            self.last_decode_positions = (done + read, padded + read - layout.real_positions)
        firsts = dict(zip(map(id, complete), sampled[decoding:]))
        return sampled[:decoding] + [firsts.get(id(r)) for r in batch]

    def _undo(self, batch: list[Request]) -> None:
        """A failed prefill forward: each request gives back the pages it took for this chunk."""
        if self.pool is not None:
            for request in batch:
                self.pool.truncate(request.id, request.prefilled)

    def drop(self, ids: set[int]) -> None:
        """Finished or aborted sequences leave (running, or part way through a chunked prefill); their pages go
        back to the pool."""
        if self.pool is not None:
            for seq in ids:
                self.pool.free(seq)
        for seq in ids:
            self.sampler.forget(seq)
        self.rows = [r for r in self.rows if r.id not in ids]

    def reset(self) -> None:
        """Forget the whole running set (after a failed step)."""
        for request in self.rows:
            self.sampler.forget(request.id)
        if self.pool is not None:
            self.pool.free_all()
        self.rows = []

    def kv_bytes(self) -> int:
        return 0 if self.pool is None else self.pool.nbytes()
