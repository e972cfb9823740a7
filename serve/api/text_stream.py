"""Token ids turned back into text: the incremental detokeniser every response uses."""

from __future__ import annotations


class TextStream:
    """Token ids in, text deltas out; stop strings cut the text and end the request.

    Decodes a sliding window (vLLM's prefix/read offsets) so a multi-byte character
    split over tokens is held back until complete, and holds back any tail that could
    still grow into a stop string.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""          # decoded so far (may include a stop string at the end)
        self.sent = 0           # chars of self.text already emitted
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may be sent now ("" if held back)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
            elif not final:
                end -= self._stop_prefix_len()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        if not self.stopped:
            rest = self._decode(self.ids[self._prefix:])
            done = self._decode(self.ids[self._prefix:self._read])
            if len(rest) > len(done):
                self.text += rest[len(done):].rstrip("\ufffd")
        return self._release(final=True)
