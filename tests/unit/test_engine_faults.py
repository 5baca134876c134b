"""Faults in the engine with a real model: a failed forward is undone and retried in halves, so only the
rows that fail alone end with an error; out-of-memory never changes a token; every request gets one final."""

from __future__ import annotations

import pytest
import torch

from bucketserve.engine.request import FinishReason, Request, SamplingParams
from bucketserve.executor.faults import FaultPlan, InjectedFault, parse_rule
from bucketserve.engine.executor import Executor
from tests.unit.test_engine import PROMPTS, Collector, make, new_engine
from tests.waiting import wait_for



def decoding_method(runner: Executor) -> str:
    """What the engine decodes through: the unified step (prefill and decode in one forward), or ``decode``."""
    return "step" if runner.unified_step else "decode"


def test_a_failed_step_fails_its_requests_once_and_the_engine_keeps_serving(model, runner, reference, monkeypatch):
    real_decode = getattr(runner, decoding_method(runner))
    calls = {"n": 0}

    def flaky_decode(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_decode(*args)

    monkeypatch.setattr(runner, decoding_method(runner), flaky_decode)
    engine, collector = new_engine(model)
    victims = [make(model, p, max_tokens=50) for p in PROMPTS[:2]]
    for r in victims:
        engine.submit(r)
    engine.start()  # both join the first step's prefill; the second step's decode fails
    collector.wait([r.id for r in victims])
    for r in victims:
        finals = collector.finals[r.id]
        assert len(finals) == 1 and finals[0].finish_reason is FinishReason.ERROR and finals[0].error
    assert runner.kv_bytes() == 0
    after = make(model, PROMPTS[2], max_tokens=10)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    assert collector.tokens[after.id] == reference(after.prompt_ids, 10)


def test_a_request_finished_by_prefill_gets_its_final_even_if_that_steps_decode_fails(model, runner, monkeypatch):
    real_decode = getattr(runner, decoding_method(runner))

    def broken_decode(*args):
        if runner.rows:  # every step that decodes a row fails
            raise RuntimeError("injected failure")
        return real_decode(*args)

    monkeypatch.setattr(runner, decoding_method(runner), broken_decode)
    engine, collector = new_engine(model)
    survivor, victim = make(model, "a", max_tokens=1), make(model, "b", max_tokens=50)
    engine.submit(survivor)
    engine.submit(victim)
    engine.start()  # both are drained before the first step, so they share its prefill batch
    collector.wait([survivor.id, victim.id])
    engine.stop()
    assert [e.finish_reason for e in collector.finals[survivor.id]] == [FinishReason.LENGTH]
    assert [e.finish_reason for e in collector.finals[victim.id]] == [FinishReason.ERROR]


def faults(runner: Executor, monkeypatch, *rules: str) -> None:
    monkeypatch.setattr(runner, "fault_hook", FaultPlan([parse_rule(r) for r in rules], oom_error=torch.OutOfMemoryError))


def wait_for_tokens(collector: Collector, request: Request, n: int) -> None:
    wait_for(lambda: len(collector.tokens[request.id]) >= n, timeout=60)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_failing_row_fails_alone_and_its_batch_mates_go_on(model, runner, reference, monkeypatch, stage):
    """The victim shares its prefill batch and decode group with others: the failed forward is undone
    and retried in halves until only the victim's own forward fails."""
    faults(runner, monkeypatch, f"{stage}:error:text=BOOM")
    engine, collector = new_engine(model, max_num_seqs=6)
    mates = [make(model, p, max_tokens=30) for p in PROMPTS[:5]]
    victim = make(model, "BOOM " + PROMPTS[2], max_tokens=30)
    for r in [*mates[:3], victim, *mates[3:]]:
        engine.submit(r)
    engine.start()  # queued together, they share prefill batches and decode groups
    collector.wait([r.id for r in [*mates, victim]])
    after = make(model, PROMPTS[3], max_tokens=10)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    [final] = collector.finals[victim.id]
    assert final.finish_reason is FinishReason.ERROR and "InjectedFault" in final.error
    assert len(collector.tokens[victim.id]) == (0 if stage == "prefill" else 1)  # decode: its prefill token came
    for r in [*mates, after]:
        assert [e.error for e in collector.finals[r.id]] == [None]
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens)
    assert engine.stats.failed == 1 and runner.rows == [] and runner.kv_bytes() == 0


def test_out_of_memory_is_retried_in_halves_without_changing_a_token(model, runner, reference, monkeypatch):
    """Every forward of more than one row runs out of memory: prefill batches and decode groups are
    split down to single rows over the same KV slabs, and greedy tokens stay exactly generate()'s."""
    faults(runner, monkeypatch, "prefill:oom:rows>1", "decode:oom:rows>1")
    if not runner.page_size:
        monkeypatch.setattr(runner, "kv_cache_growth", 3)  # slabs regrow often, also while split
    retries = runner.oom_retries
    engine, collector = new_engine(model, max_num_seqs=5)
    requests = [make(model, p, max_tokens=12 + 3 * i) for i, p in enumerate(PROMPTS[:5])]
    for r in requests:
        engine.submit(r)
    engine.start()  # all five share the first prefill batch and then one decode group
    collector.wait([r.id for r in requests])
    engine.stop()
    for r in requests:
        assert [e.error for e in collector.finals[r.id]] == [None]
        assert collector.tokens[r.id] == reference(r.prompt_ids, r.sampling.max_tokens), r.prompt[:30]
    assert runner.oom_retries - retries > 12 and engine.stats.oom_retries == runner.oom_retries


def test_a_row_out_of_memory_alone_fails_and_the_engine_keeps_serving(model, runner, reference, monkeypatch):
    faults(runner, monkeypatch, "decode:oom:text=BOOM")
    engine, collector = new_engine(model)
    victim = make(model, "BOOM", max_tokens=20)
    engine.submit(victim)
    engine.start()
    collector.wait([victim.id])
    after = make(model, PROMPTS[0], max_tokens=8)
    engine.submit(after)
    collector.wait([after.id])
    engine.stop()
    assert "OutOfMemoryError" in collector.finals[victim.id][0].error
    assert collector.tokens[after.id] == reference(after.prompt_ids, 8)


def test_fault_rules_parse_and_refuse_nonsense():
    rule = parse_rule("decode:oom:rows>2")
    assert rule.fires("decode", [object()] * 3) and not rule.fires("decode", [object()] * 2)
    assert not rule.fires("prefill", [object()] * 3)
    with pytest.raises(InjectedFault):
        FaultPlan([parse_rule("prefill:error:text=X")], MemoryError)("prefill", [make_prompt("aXb")])
    for bad in ("decode:oom", "encode:oom:rows>1", "decode:crash:rows>1", "decode:oom:rows>x", "decode:oom:text="):
        with pytest.raises(ValueError):
            parse_rule(bad)


def make_prompt(text: str) -> Request:
    return Request(text, [1], SamplingParams())
