"""The prompt cache of one shard: finished sessions' KV caches, kept in
bytes the plan reserved, least recently used out first, found by the
longest common prefix of a new session's tokens (mlx-lm's PromptTrie).

Lookups run on RPC threads (OpenSession must answer at once) and return a
pin: a reference to the entry's caches, which stays valid after eviction.
Copying a pin into a session's own caches (`materialize`) is MLX work and
runs on the compute thread. A session that just ended is announced at once
(`announce`, on the RPC thread) though its caches arrive only when the
compute thread gets to them: a conversation's next turn, sent the moment
the last one ends, finds it all the same."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mlx_lm.models.cache import PromptTrie, trim_prompt_cache

_MODEL = "shard"  # the trie is per shard already; one key space


class Arriving:
    """An entry on its way in: its caches are set when they are stored."""

    __slots__ = ("caches",)

    def __init__(self) -> None:
        self.caches: Optional[list[Any]] = None


@dataclass(frozen=True)
class Pin:
    """Up to `tokens` leading tokens of a session can reuse `caches`."""

    tokens: int
    caches: Any  # list of per-layer caches, or an Arriving entry
    length: int  # tokens the entry's caches hold


def cache_bytes(caches: Sequence[Any]) -> int:
    return sum(c.nbytes for c in caches)


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._trie = PromptTrie()
        self._lru: "OrderedDict[tuple[int, ...], int]" = OrderedDict()  # key -> bytes
        self._bytes = 0
        self._arriving: dict[tuple[int, ...], Arriving] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, prompt: Sequence[int]) -> Optional[Pin]:
        """The best reusable prefix of `prompt` (never all of it: the last
        prompt token must run to give the first answer token)."""
        tokens = list(prompt)
        if len(tokens) < 2:
            return None
        with self._lock:
            found = self._trie.search(_MODEL, tokens)
            best: Optional[tuple[int, list[int]]] = None
            if found.exact is not None:
                best = (len(tokens) - 1, found.exact)
            else:
                if found.shorter is not None:
                    best = (len(found.shorter), found.shorter)
                if found.longer is not None:
                    n = min(len(tokens) - 1, found.common_prefix)
                    if best is None or n > best[0]:
                        best = (n, found.longer)
            for key, entry in self._arriving.items():
                n = min(len(tokens) - 1, _common(key, tokens))
                if n >= 1 and (best is None or n > best[0]):
                    return Pin(n, entry, len(key))
            if best is None or best[0] < 1:
                return None
            key = tuple(best[1])
            self._lru.move_to_end(key)
            caches = self._trie.get(_MODEL, best[1])
            return Pin(best[0], caches, len(key))

    def announce(self, tokens: Sequence[int], nbytes: int) -> None:
        """Caches holding `tokens` (about `nbytes`) will be inserted shortly."""
        key = tuple(tokens)
        if len(key) > 1 and nbytes <= self.max_bytes:
            with self._lock:  # one entry for equal tokens: every pin of it gets the caches
                self._arriving.setdefault(key, Arriving())

    def withdraw(self, tokens: Sequence[int]) -> None:
        """An announced entry that will not come after all."""
        with self._lock:
            self._arriving.pop(tuple(tokens), None)

    def insert(self, tokens: Sequence[int], caches: list[Any]) -> bool:
        """Keep `caches` (holding exactly `tokens`) unless they alone exceed
        the room; older entries leave until they fit. Entries that are a
        prefix of the new one are dropped: the new one serves them too."""
        key = tuple(tokens)
        size = cache_bytes(caches)
        with self._lock:
            arriving = self._arriving.pop(key, None)
            if arriving is not None:
                arriving.caches = caches  # sessions that pinned it before it came
        if not key or size > self.max_bytes:
            return False
        with self._lock:
            if key in self._lru:
                self._pop(key)
            self._trie.add(_MODEL, list(key), caches)
            for n, _ in self._trie.pop_prefixes(_MODEL, list(key)):
                self._bytes -= self._lru.pop(key[:n])
            self._lru[key] = size
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._pop(next(iter(self._lru)))
        return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._lru):
                self._pop(key)

    def _pop(self, key: tuple[int, ...]) -> None:
        self._trie.pop(_MODEL, list(key))
        self._bytes -= self._lru.pop(key)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compact(caches: list[Any]) -> list[Any]:
    """Cut each cache's buffers to the positions it holds, so an entry costs
    exactly its tokens (KVCache grows in 256-position steps). Compute thread."""
    import mlx.core as mx

    for c in caches:
        if getattr(c, "keys", None) is not None and c.offset < c.keys.shape[2]:
            c.keys = mx.contiguous(c.keys[..., :c.offset, :])
            c.values = mx.contiguous(c.values[..., :c.offset, :])
    mx.eval([(c.keys, c.values) for c in caches if getattr(c, "keys", None) is not None])
    return caches


def materialize(pin: Pin, tokens: int) -> list[Any]:
    """A session's own copy of a pinned entry, cut to its first `tokens`
    (compute thread: copying arrays is MLX work)."""
    held = pin.caches.caches if isinstance(pin.caches, Arriving) else pin.caches
    if held is None:
        raise LookupError("the prompt cache entry this session started from never arrived")
    caches = copy.deepcopy(held)
    if pin.length > tokens:
        trim_prompt_cache(caches, pin.length - tokens)
    return caches
