"""Sampling rules: greedy, min_tokens, seeded sampling independent of batch mates."""

from __future__ import annotations

import torch

from bucketserve.engine.request import Request, SamplingParams
from bucketserve.executor.sampler import Sampler

EOS = 2


def req(num_output: int = 0, **sampling) -> Request:
    r = Request("p", [1], SamplingParams(**sampling))
    r.output_ids = [5] * num_output
    return r


def logits(favourite: int, vocab: int = 10) -> torch.Tensor:
    row = torch.zeros(vocab)
    row[favourite] = 10.0
    row[7] = 9.0  # the runner-up
    return row


def test_greedy_picks_argmax_and_min_tokens_suppresses_eos():
    sampler = Sampler(torch.device("cpu"), frozenset([EOS]))
    batch = torch.stack([logits(EOS), logits(EOS), logits(4)])
    rows = [req(0, temperature=0.0, min_tokens=2), req(2, temperature=0.0, min_tokens=2), req(temperature=0.0)]
    assert sampler(batch, rows) == [7, EOS, 4]


def test_top_k_1_and_tiny_top_p_are_greedy():
    sampler = Sampler(torch.device("cpu"), frozenset([EOS]))
    flat = torch.zeros(1, 100)
    flat[0, 42] = 0.5
    for params in ({"top_k": 1}, {"top_p": 0.001}):
        picks = {sampler(flat.clone(), [req(temperature=5.0, seed=s, **params)])[0] for s in range(20)}
        assert picks == {42}, params
    wide = {sampler(flat.clone(), [req(temperature=5.0, seed=s)])[0] for s in range(20)}
    assert len(wide) > 10  # without the filters the flat distribution is really sampled
