"""Next-token choice for a whole batch at once: greedy rows take the argmax; sampled rows get their
temperature, top-k and top-p applied as batched tensor ops, then draw through the exponential race
(the argmax of ``probs / E`` with ``E ~ Exp(1)`` per vocabulary entry, which picks token ``i`` with
probability ``probs[i]``).

Each sampled request draws its noise from its own generator, seeded from its ``seed``, so a seeded
request gives the same tokens whatever else shares its batch. That noise is the one per-row operation.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from bucketserve.engine.request import Request


class Sampler:
    def __init__(self, device: torch.device, eos_ids: frozenset[int]):
        self.device = device
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self._generators: dict[int, torch.Generator] = {}

    def forget(self, request_id: int) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.id)
        if gen is None:
            seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed % 2**63)
            self._generators[request.id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """``logits``: [batch, vocab] for the last position of each row, in ``requests`` order."""
        logits = logits.float()
        early = [row for row, r in enumerate(requests) if r.num_output < r.sampling.min_tokens]
        if early and len(self.eos_ids):
            logits[torch.tensor(early, device=logits.device)[:, None], self.eos_ids] = -float("inf")
        tokens = logits.argmax(dim=-1)
        sampled = [row for row, r in enumerate(requests) if not r.sampling.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            tokens[rows] = self._sample(logits.index_select(0, rows), [requests[row] for row in sampled])
        return tokens.tolist()

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        dev, vocab = logits.device, logits.shape[-1]
        params = [r.sampling for r in requests]
        logits = logits / torch.tensor([s.temperature for s in params], device=dev)[:, None]
        top_k = [s.top_k if 0 < s.top_k < vocab else vocab for s in params]
        if min(top_k) < vocab:  # each row keeps its k best (ties at the k-th kept too)
            kth = logits.topk(max(top_k), dim=-1).values.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
            logits.masked_fill_(logits < kth, -float("inf"))
        top_p = torch.tensor([s.top_p for s in params], device=dev)
        if bool((top_p < 1.0).any()):
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # drop a token when the ones before it already reach top_p; the first always stays
            drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
            logits.masked_fill_(drop.scatter(1, order, drop), -float("inf"))
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, request in enumerate(requests):
            noise[row].exponential_(generator=self._generator(request))
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
