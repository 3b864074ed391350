"""Incremental detokenization for streaming: text deltas from a growing list of token ids, cut at stop strings.

Text is released only when it is final: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and a
trailing piece that could still become a stop string are held back until the next token decides them.
The concatenated deltas equal ``cut_at_stop(tokenizer.decode(ids), stops)``.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (cut at a stop string once one appears)
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False  # a stop string appeared

    def push(self, token: int) -> str:
        """Add one token; the newly final text (may be ""). After a stop string, ``stopped`` is True."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_index(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._release(cut)
        self.text = text
        return self._release(len(text) - self._holdback(text))

    def flush(self) -> str:
        """Everything not yet released (call when the sequence ends)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta

    def _stop_index(self, text: str) -> int | None:
        if not self.stops:
            return None
        start = max(0, self.sent - max(len(s) for s in self.stops))  # a stop may straddle the released text
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        n = 0
        while n < len(text) and text[len(text) - 1 - n] == REPLACEMENT:  # an unfinished multi-byte character
            n += 1
        tail = text[: len(text) - n]
        keep = 0
        for s in self.stops:  # the longest end of the text that begins a stop string
            for k in range(min(len(s) - 1, len(tail)), keep, -1):
                if s.startswith(tail[len(tail) - k:]):
                    keep = k
                    break
        return n + keep
