"""Exactly once under stress, at a size that fits CI (``make stress`` runs 2,000 requests over 64 streams)."""

from __future__ import annotations

import urllib.request

from tests import stress


def test_every_request_gets_exactly_one_final_answer_and_its_own_text(server):
    tally = stress.run(server.grpc_url, f"127.0.0.1:{server.http}", requests=240, concurrency=24, seed=1)
    assert not tally.problems, tally.problems[:10]
    assert set(tally.finals) == {1}
    kinds = tally.sent
    assert sum(kinds.values()) == 240
    for kind in ("grpc-stream", "grpc-oneshot", "grpc-cancelled", "grpc-bad", "http"):
        assert kinds[kind] > 0, kinds
    # cancelled sequences were freed: nothing is left running or waiting
    assert stress.settled(f"http://127.0.0.1:{server.metrics}/metrics") == {"running": 0, "waiting": 0}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
