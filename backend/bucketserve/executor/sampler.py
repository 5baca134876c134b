"""Next-token choice per row: greedy at temperature 0, else temperature / top-k / top-p sampling.

Each sampled request draws from its own generator seeded from its ``seed``, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from bucketserve.engine.request import Request


class Sampler:
    def __init__(self, device: torch.device, eos_ids: frozenset[int]):
        self.device = device
        self.eos_ids = sorted(eos_ids)
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
        if self.eos_ids:
            early = [row for row, r in enumerate(requests) if r.num_output < r.sampling.min_tokens]
            if early:
                logits[torch.tensor(early, device=logits.device)[:, None], torch.tensor(self.eos_ids, device=logits.device)] = -float("inf")
        tokens = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(requests):
            if not request.sampling.greedy:
                tokens[row] = self._sample(logits[row], request)
        return tokens

    def _sample(self, logits: torch.Tensor, request: Request) -> int:
        s = request.sampling
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p; the first always stays
            drop = (cumulative - sorted_logits.softmax(dim=-1)) >= s.top_p
            logits = logits.masked_fill(drop.scatter(0, order, drop), -float("inf"))
        probs = logits.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request)))
