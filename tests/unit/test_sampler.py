"""Sampling rules: greedy, min_tokens, seeded sampling independent of batch mates, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from bucketserve.engine.request import FinishReason, Request, SamplingParams
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


def test_each_row_of_a_batch_keeps_its_own_top_k_and_top_p():
    sampler = Sampler(torch.device("cpu"), frozenset([EOS]))
    ranked = torch.arange(20, 0, -1).float()[None].repeat(60, 1) / 4  # token 0 best, token 19 worst
    filters = [{"top_k": 3}, {"top_p": 0.5}, {}]  # top_p 0.5 of this softmax keeps tokens 0-2
    rows = [req(temperature=1.0, seed=i, **filters[i % 3]) for i in range(60)]
    picks = sampler(ranked, rows)
    for i, token in enumerate(picks):
        assert token < 3 or not filters[i % 3], (filters[i % 3], token)
    assert max(picks[2::3]) >= 3  # the unfiltered rows do reach past the filtered sets


def test_sampled_frequencies_follow_the_softmax():
    sampler = Sampler(torch.device("cpu"), frozenset([EOS]))
    want = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    picks = sampler(want.log()[None].repeat(n, 1), [req(temperature=1.0, seed=s) for s in range(n)])
    got = torch.bincount(torch.tensor(picks), minlength=4).float() / n
    assert torch.allclose(got, want, atol=0.03), got


def test_a_seeded_row_draws_the_same_alone_or_in_a_batch():
    flat = torch.zeros(1, 50)
    alone = [Sampler(torch.device("cpu"), frozenset())(flat.clone(), [req(temperature=1.0, seed=7)])[0]
             for _ in range(2)]
    crowd = Sampler(torch.device("cpu"), frozenset())(flat.repeat(3, 1), [req(temperature=1.0, seed=1),
                                                                            req(temperature=1.0, seed=7),
                                                                            req(temperature=0.0)])
    assert alone[0] == alone[1] == crowd[1]


def test_penalties_follow_vllm_and_touch_only_their_own_rows():
    sampler = Sampler(torch.device("cpu"), frozenset())
    row = torch.tensor([[3.0, 2.9, 2.8, -1.0]])
    seen = req(temperature=0.0, repetition_penalty=1.5)
    seen.prompt_ids, seen.output_ids = [0], [3]
    assert sampler(row.clone(), [seen]) == [1]  # 3.0 / 1.5 = 2.0 loses to 2.9; the negative logit only falls
    repeated = req(temperature=0.0, frequency_penalty=0.1)
    repeated.output_ids = [0]  # once: 3.0 - 0.1 = 2.9 still beats 2.85
    assert sampler(torch.tensor([[3.0, 2.85, 0.0]]), [repeated]) == [0]
    repeated.output_ids = [0, 0]  # twice: 2.8 loses
    assert sampler(torch.tensor([[3.0, 2.85, 0.0]]), [repeated]) == [1]
    present = req(temperature=0.0, presence_penalty=0.15)
    present.output_ids = [0, 0, 0, 1]  # once per token, however often: 2.85 and 2.75 against 2.8
    assert sampler(row.clone(), [present]) == [0]
    plain = req(temperature=0.0)
    present.output_ids = plain.output_ids = [0]  # 2.85 < 2.9 for the penalized row only
    assert sampler(torch.tensor([[3.0, 2.9, 0.0]]).repeat(2, 1), [present, plain]) == [1, 0]


def test_logprobs_are_the_models_distribution_with_rank_and_alternatives():
    sampler = Sampler(torch.device("cpu"), frozenset())
    raw = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    rows = [req(temperature=0.0, logprobs=2, repetition_penalty=2.0), req(temperature=0.0)]
    rows[0].output_ids = [1]  # penalized: 3.0 -> 1.5 loses to 2.0, but logprobs stay the model's own
    assert sampler(raw.clone(), rows) == [2, 2]
    taken = sampler.take_logprobs()
    assert set(taken) == {rows[0].id} and sampler.take_logprobs() == {}
    want = raw[0].log_softmax(-1)
    lp = taken[rows[0].id]
    assert lp.logprob == pytest.approx(want[2].item()) and lp.rank == 2
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(want[1].item())


def test_stop_token_ids_are_held_back_until_min_tokens_and_then_end_the_request():
    sampler = Sampler(torch.device("cpu"), frozenset([EOS]))
    early = req(0, temperature=0.0, min_tokens=1, stop_token_ids=(4,))
    assert sampler(torch.stack([logits(4)]), [early]) == [7]
    done = req(1, temperature=0.0, min_tokens=1, stop_token_ids=(4,), ignore_eos=True)
    assert done.append_token(4, frozenset([EOS])) is FinishReason.STOP
    assert req(1, temperature=0.0, ignore_eos=True).append_token(EOS, frozenset([EOS])) is None
