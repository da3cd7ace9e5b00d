"""Splitting a reasoning model's output into its reasoning and its answer,
as the text streams in.

R1 and its distills think between `<think>` and `</think>`. Their chat
template opens `<think>` in the prompt itself, so the output starts inside
the reasoning; a model whose template does not may still open it as its
first words. Whatever the pieces the text arrives in, the result is the
same: the reasoning is the text between the tags without the whitespace
around it, the answer is what follows `</think>` without leading whitespace.
Output that never opens `<think>` is all answer, unchanged."""

from __future__ import annotations

from clusterd.serve.stops import held_prefix

OPEN = "<think>"
CLOSE = "</think>"

_START, _REASONING, _AFTER, _ANSWER = "start", "reasoning", "after", "answer"


class ReasoningParser:
    """feed(piece) -> (reasoning, content) that can be shown now; finish()
    flushes what was held back. Not thread-safe: one per answer."""

    def __init__(self, starts_inside: bool):
        self._state = _REASONING if starts_inside else _START
        self._buf = ""
        self._reasoned = starts_inside  # has the output reasoned at all
        self._shown_reasoning = False  # leading whitespace of the reasoning is dropped

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    @property
    def reasoned(self) -> bool:
        """True once the output is known to reason (its template or its first words)."""
        return self._reasoned

    def feed(self, piece: str) -> tuple[str, str]:
        self._buf += piece
        reasoning, content = [], []
        while True:
            before = self._state
            r, c = self._step()
            reasoning.append(r)
            content.append(c)
            if self._state == before:
                return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self._state == _START:
            return "", buf  # a prefix of `<think>` and nothing more: answer text
        if self._state == _REASONING:
            text = buf.rstrip()
            return (text if self._shown_reasoning else text.lstrip()), ""
        if self._state == _AFTER:
            return "", buf.lstrip()
        return "", buf

    def _step(self) -> tuple[str, str]:
        """One state's worth of work on the buffer; returns what it releases."""
        buf = self._buf
        if self._state == _START:
            stripped = buf.lstrip()
            if stripped.startswith(OPEN):
                self._state, self._reasoned = _REASONING, True
                self._buf = stripped[len(OPEN):]
            elif not OPEN.startswith(stripped):
                self._state, self._buf = _ANSWER, ""
                return "", buf
            return "", ""
        if self._state == _REASONING:
            end = buf.find(CLOSE)
            if end >= 0:
                self._state, self._buf = _AFTER, buf[end + len(CLOSE):]
                return self._show(buf[:end].rstrip()), ""
            # Hold what may begin `</think>`, and trailing whitespace (it may
            # turn out to be the whitespace before the tag).
            cut = len(buf) - held_prefix(buf, CLOSE)
            ready = buf[:cut].rstrip()
            self._buf = buf[len(ready):]
            return self._show(ready), ""
        if self._state == _AFTER:
            stripped = buf.lstrip()
            if stripped:
                self._state = _ANSWER
            self._buf = ""
            return "", stripped
        self._buf = ""
        return "", buf

    def _show(self, text: str) -> str:
        if not self._shown_reasoning:
            text = text.lstrip()
            self._shown_reasoning = bool(text)
        return text


def split_reasoning(text: str, starts_inside: bool) -> tuple[str, str]:
    """The whole text at once: (reasoning, content)."""
    parser = ReasoningParser(starts_inside)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return r1 + r2, c1 + c2
