"""The response thread's pacing of streamed responses (no server needed)."""

import pytest

from bucketserve.triton.pacing import StreamPacer


def test_few_streams_keep_the_floor():
    pacer = StreamPacer(floor_s=0.05, share=0.2)
    pacer.opened()
    for _ in range(200):
        pacer.sent(0.002)
    assert pacer.interval_s == 0.05  # one stream at 2 ms a response: 4% of the time
    assert pacer.due(None, 0.0)
    assert not pacer.due(1.0, 1.04)
    assert pacer.due(1.0, 1.05)


def test_many_streams_are_spaced_to_the_share_and_back():
    pacer = StreamPacer(floor_s=0.05, share=0.2)
    for _ in range(64):
        pacer.opened()
    for _ in range(200):
        pacer.sent(0.002)
    # 64 streams x 2 ms / 20% of the time: each stream answered every 0.64 s
    assert pacer.interval_s == pytest.approx(64 * 0.002 / 0.2, rel=1e-3)
    assert not pacer.due(0.0, 0.5)
    assert pacer.due(0.0, 0.65)
    for _ in range(63):
        pacer.closed()
    assert pacer.interval_s == 0.05


def test_cost_follows_the_latest_responses():
    pacer = StreamPacer(floor_s=0.0, share=1.0)
    pacer.opened()
    pacer.sent(0.010)
    assert 0 < pacer.cost_s < 0.010  # one slow response moves the average, not all of it
    for _ in range(300):
        pacer.sent(0.001)
    assert pacer.cost_s == pytest.approx(0.001, rel=0.01)
    assert pacer.interval_s == pytest.approx(0.001, rel=0.01)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="share"):
        StreamPacer(0.05, share)
