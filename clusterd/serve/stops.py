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
        cut = self._first_hit(buf)
        # Where a stop might still begin (one not complete yet): when that is
        # before the hit, a longer stop starting earlier may win; wait for it.
        start = len(buf) - max(held_prefix(buf, s) for s in self._stops)
        if cut is not None and cut <= start:
            self.matched, self._buf = True, ""
            return buf[:cut], True
        self._buf = buf[start:]
        return buf[:start], False

    def finish(self) -> str:
        """What was held back, once the text has ended (cut at a stop in it)."""
        buf, self._buf = self._buf, ""
        if self.matched:
            return ""
        cut = self._first_hit(buf)
        self.matched = cut is not None
        return buf if cut is None else buf[:cut]

    def _first_hit(self, text: str):
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None


def held_prefix(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
