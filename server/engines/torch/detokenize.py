"""Turning generated token ids into text as they arrive, and finding stop strings in it.

Decoding each new token alone breaks multi-byte characters and word-initial spaces, so (as vLLM
does) we decode a short window of earlier tokens with it and keep only the new part. Text that
could be the start of a stop string is held back from the stream until it is decided.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # first token whose text is not yet in self.text
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet (special token, or half a character)
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


    def finish(self) -> str:
        """Decode whatever is still pending at the end, incomplete characters included."""
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


class StopStrings:
    """Tracks how much of the text is safe to stream and where a stop string ends it."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self.sent = 0  # characters of text already streamed

    def check(self, text: str, new_chars: int) -> tuple[str, bool]:
        """Return (text that may be sent now, whether a stop string was found)."""
        if not self.stops:
            out, self.sent = text[self.sent :], len(text)
            return out, False
        start = max(0, len(text) - new_chars - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent = text[self.sent : end], end
            return out, True
        safe = len(text) - self._partial_suffix(text)
        out = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out, False

    def flush(self, text: str) -> str:
        """Release the held-back tail when the sequence ends for another reason."""
        out, self.sent = text[self.sent :], len(text)
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that starts some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
