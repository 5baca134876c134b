"""From generated token ids to the text a client sees: incremental detokenization and stop words.

Runs on the response thread, not the engine thread. Text is released only where it is complete:
a multi-byte character split across tokens is held until it is whole, and when stop words are
set, the last ``len(longest stop) - 1`` characters are held until they cannot start a stop word.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix_offset = 0  # ids before this are fully reflected in self._text
        self._read_offset = 0
        self._text = ""  # decoded so far
        self._sent = 0  # characters of self._text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text that can be released now. Sets ``stopped`` on a stop word."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release everything still held (the stream is over)."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix_offset:])
            prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
            self._text += tail[len(prefix):]
            self._read_offset = len(self.ids)
            self._prefix_offset = self._read_offset
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            start = max(0, self._sent - self._hold)
            hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self._text = self._text[:min(hits)]
                self.stopped = True
                final = True
        end = len(self._text) if final else max(self._sent, len(self._text) - self._hold)
        chunk = self._text[self._sent:end]
        self._sent = end
        return chunk
