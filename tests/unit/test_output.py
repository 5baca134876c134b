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
