"""Stop sequences over streamed text: a stop string may span any number of
pieces (tokens); the text shown stops just before it."""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """feed(piece) -> (text safe to show, matched). Text that may be the
    start of a stop string is held back until the next piece decides it."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._buf = ""
        self.matched = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self._stops:
            return piece, False
        buf = self._buf + piece
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.matched, self._buf = True, ""
            return buf[:min(hits)], True
        held = max(held_prefix(buf, s) for s in self._stops)
        self._buf = buf[len(buf) - held:] if held else ""
        return buf[:len(buf) - held], False

    def finish(self) -> str:
        """What was held back, once the text has ended without a match."""
        buf, self._buf = self._buf, ""
        return "" if self.matched else buf


def held_prefix(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
