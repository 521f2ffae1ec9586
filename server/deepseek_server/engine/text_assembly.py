"""Turn generated token ids into streamed text with stop strings, never cutting a character or a stop in half.

Decoding is incremental (the "prefix/read offset" method): each token decodes only a short window of recent ids,
so a long generation costs O(length), not O(length^2) decodes of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TextAssembler:
    """Accumulates token ids for one sequence and releases text that is final.

    Text that might still become (part of) a stop string, or ends in an incomplete UTF-8 sequence, is held back
    until the next token decides it.
    """

    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all text decoded so far (released or held)
    emitted: int = 0  # how much of `text` has been released
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def add(self, token_id: int) -> str:
        """Add one token; return the newly final text (may be empty). Sets `stopped` on a stop string."""
        self.token_ids.append(token_id)
        self.text += self._decode_new()
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._release(min(at, self._earliest_stop()))
        return self._release(len(self.text) - self._held_suffix())

    def finish(self) -> str:
        """Release whatever was held back at the end of generation (not after a stop)."""
        if self.stopped:
            return ""
        prefix = self.decode(self.token_ids[self._prefix_offset:self._read_offset])
        tail = self.decode(self.token_ids[self._prefix_offset:])
        self.text += tail[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return self._release(len(self.text))

    def _decode_new(self) -> str:
        prefix = self.decode(self.token_ids[self._prefix_offset:self._read_offset])
        window = self.decode(self.token_ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            return window[len(prefix):]
        return ""  # an incomplete character: wait for the next token

    def _earliest_stop(self) -> int:
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        return min(hits) if hits else len(self.text)

    def _held_suffix(self) -> int:
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
