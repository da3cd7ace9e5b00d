"""Drafts by prompt lookup: the continuation of the latest earlier occurrence of the
history's last n tokens (prompt plus output so far), longest n first. Works with every
model; costs no model evaluation.

The index is incremental, one per session: appending a token records, for each n, that
the n-gram just before it was followed by it, so a proposal is at most max_n dictionary
lookups however long the history is. N-grams are packed into one int (32 bits a token:
exact, no collisions, and cheaper than tuples).
"""

from __future__ import annotations

from typing import Iterable

_TOKEN_BITS = 32
_TOKEN_LIMIT = 1 << _TOKEN_BITS


class PromptLookup:
    """Per-session history and index. propose(k) -> up to k token ids (fewer, or none,
    when nothing in the history matches the current suffix)."""

    def __init__(self, tokens: Iterable[int] = (), *, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._tokens: list[int] = []
        # _next[n - min_n][packed n-gram] = index of the token that followed its latest
        # occurrence (always < len(history): the current suffix itself is never indexed).
        self._next: list[dict[int, int]] = [{} for _ in range(max_n - min_n + 1)]
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append accepted tokens (the prompt, then each trip's emitted tokens)."""
        for t in tokens:
            t = int(t)
            if not 0 <= t < _TOKEN_LIMIT:
                raise ValueError(f"token id {t} is not a non-negative 32-bit integer")
            at = len(self._tokens)
            for i, table in enumerate(self._next):
                n = self.min_n + i
                if at >= n:
                    table[self._pack(at - n, at)] = at
            self._tokens.append(t)

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        end = len(self._tokens)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._next[n - self.min_n].get(self._pack(end - n, end))
            if start is not None:
                return self._copy(start, k)
        return []

    def _copy(self, start: int, k: int) -> list[int]:
        # A match near the end runs into the draft itself (a repeating loop): keep copying
        # from what was just proposed, as an overlapping LZ77 copy does.
        end = len(self._tokens)
        out: list[int] = []
        for j in range(k):
            pos = start + j
            out.append(self._tokens[pos] if pos < end else out[pos - end])
        return out

    def _pack(self, start: int, end: int) -> int:
        key = 0
        for t in self._tokens[start:end]:
            key = (key << _TOKEN_BITS) | t
        return key
