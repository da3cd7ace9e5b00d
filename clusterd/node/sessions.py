"""Per-session state on a node: its KV caches and, on the last stage, its
sampling parameters and the queue its generated tokens stream from."""

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from clusterd.wire import clusterd_pb2 as pb


@dataclass
class Session:
    session_id: str
    caches: list[Any]
    next_address: str
    sampler: Optional[Callable] = None
    max_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    timeout_s: float = 300.0
    produced: int = 0
    closed: bool = False
    events: "queue.Queue[pb.TokenEvent]" = field(default_factory=queue.Queue)
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    @property
    def cached_tokens(self) -> int:
        return int(self.caches[0].offset) if self.caches and self.caches[0].offset else 0

    @property
    def kv_bytes(self) -> int:
        total = 0
        for c in self.caches:
            if c.keys is not None:
                total += c.keys.nbytes + (c.values.nbytes if c.values is not None else 0)
        return total


class SessionTable:
    """Thread-safe table of open sessions. Caches are freed by dropping them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(self, session: Session) -> None:
        with self._lock:
            old = self._sessions.pop(session.session_id, None)
            self._sessions[session.session_id] = session
        if old is not None:
            _finish(old, "error", "session was reopened")

    def get(self, session_id: str) -> Optional[Session]:
        with self._lock:
            return self._sessions.get(session_id)

    def end(self, session_id: str, reason: str = "ended") -> Optional[int]:
        """Bytes freed, or None when there was no such session."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return None
        freed = s.kv_bytes
        _finish(s, "error" if reason != "ended" else "stop", "" if reason == "ended" else reason)
        return freed

    def end_all(self, reason: str) -> int:
        with self._lock:
            ids = list(self._sessions)
        return sum(self.end(i, reason) or 0 for i in ids)

    def expire(self, now: Optional[float] = None) -> list[str]:
        """End sessions idle longer than their timeout (a vanished coordinator)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s.session_id for s in self._sessions.values() if now - s.last_active > s.timeout_s]
        for sid in stale:
            self.end(sid, "session timed out")
        return stale

    def snapshot(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())


def _finish(s: Session, reason: str, error: str) -> None:
    """Wake a waiting token stream so it can close."""
    s.closed = True
    s.caches = []
    s.events.put(pb.TokenEvent(done=True, finish_reason=reason, error=error))
