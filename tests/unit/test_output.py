"""Incremental detokenization and stop words, with the real byte-level BPE tokenizer."""

from __future__ import annotations

from bucketserve.engine.detokenizer import TextStream


def stream_all(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = [stream.push([i]) for i in ids]
    return pieces + [stream.finish()]


def test_deltas_add_up_to_the_full_decode(tokenizer):
    text = "naïve café — 日本語 text, emoji 🎉 and code: def f(x): return x"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = stream_all(TextStream(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)  # split characters are held until whole


def test_special_tokens_do_not_show(tokenizer):
    ids = tokenizer("hello").input_ids + [tokenizer.eos_token_id]
    assert "".join(stream_all(TextStream(tokenizer), ids)) == "hello"


def test_stop_word_truncates_and_is_never_released(tokenizer):
    ids = tokenizer("one two three four five", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, stop=("three",))
    released = []
    for i in ids:
        released.append(stream.push([i]))
        if stream.stopped:
            break
    released.append(stream.finish())
    assert stream.stopped and "".join(released) == "one two "
    assert not any("thr" in p for p in released)


def test_text_that_only_looks_like_a_stop_word_start_is_released(tokenizer):
    ids = tokenizer("the thread then", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, stop=("three",))
    assert "".join(stream_all(stream, ids)) == "the thread then" and not stream.stopped


def test_events_that_piled_up_become_one_output_per_request(tokenizer):
    from bucketserve.engine.outputs import Event, OutputProcessor
    from bucketserve.engine.request import FinishReason, Request, SamplingParams

    aborted = []
    processor = OutputProcessor(tokenizer, lambda rid, why: aborted.append((rid, why)))
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    a, b = Request("a", [1], SamplingParams()), Request("b", [1], SamplingParams(stop=("three",)))
    events = [Event(a, [i]) for i in ids[:2]] + [Event(b, [i]) for i in ids] + [Event(a, [ids[2]], FinishReason.LENGTH)]
    out_a, out_b = processor.process(events)
    assert out_a.token_ids == ids[:3] and out_a.finish_reason is FinishReason.LENGTH
    assert out_a.text == tokenizer.decode(ids[:3])
    # b's stop string ends it here: the engine is told, and what it sends for b until its final is dropped
    assert out_b.text == "one two " and out_b.finish_reason is FinishReason.STOP and aborted == [(b.id, FinishReason.STOP)]
    assert processor.process([Event(b, [ids[0]]), Event(b, [], FinishReason.STOP)]) == []


def test_an_error_after_text_is_an_output_of_its_own(tokenizer):
    """A streaming client gets the text that came before the failure, then the failure."""
    from bucketserve.engine.outputs import Event, OutputProcessor
    from bucketserve.engine.request import FinishReason, Request, SamplingParams

    r = Request("r", [1], SamplingParams())
    token = tokenizer("hello", add_special_tokens=False).input_ids
    text, error = OutputProcessor(tokenizer, lambda *_: None).process(
        [Event(r, token), Event(r, [], FinishReason.ERROR, error="boom")])
    assert (text.text, text.finished) == ("hello", False)
    assert (error.text, error.finish_reason, error.error) == ("", FinishReason.ERROR, "boom")


def test_outputs_a_lagging_front_end_holds_coalesce_per_request_keeping_errors_apart(tokenizer):
    from bucketserve.engine.outputs import RequestOutput, coalesce
    from bucketserve.engine.request import FinishReason, Request, SamplingParams

    a, b = Request("a", [1], SamplingParams()), Request("b", [1], SamplingParams())
    merged = coalesce([RequestOutput(a, "x", [1]), RequestOutput(b, "y", [2]), RequestOutput(a, "z", [3]),
                       RequestOutput(a, "", [], FinishReason.LENGTH), RequestOutput(b, "w", [4]),
                       RequestOutput(b, "", [], FinishReason.ERROR, "boom")])
    assert [(o.request, o.text, o.token_ids, o.finish_reason, o.error) for o in merged] == [
        (a, "xz", [1, 3], FinishReason.LENGTH, None), (b, "yw", [2, 4], None, None),
        (b, "", [], FinishReason.ERROR, "boom")]
