"""Per-session state on a node. RPC threads open and end sessions; the
compute thread alone touches a session's caches, group and sampler."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from clusterd.node.cache_store import Pin

MAX_ID_CHARS = 128


class SessionRefused(ValueError):
    """OpenSession cannot be granted; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    session_id: str
    shard: str
    client_id: str
    next_address: str  # "" when this node is the whole ring
    timeout_s: float
    prompt: tuple[int, ...] = ()
    pin: Optional[Pin] = None  # prompt-cache entry to start from
    # Last stage only: how it samples and when it stops.
    sampler: Any = None  # clusterd.node.sampling.RowSampler
    max_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    drafts: Any = None  # clusterd.node.drafting.SessionDrafts when it drafts
    # Compute thread only.
    caches: Optional[list[Any]] = None  # its own caches while in no group
    group: int = 0  # decode group holding its caches (0: none)
    length: int = 0  # positions its caches hold
    produced: int = 0
    answer: list[int] = field(default_factory=list)
    # Any thread.
    closed: bool = False
    end_reason: str = ""
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()


class SessionTable:
    """Open sessions by id, at most `limit(shard)` per shard. An ended session
    stays findable by `holder` until its caches are released: a step that
    drops its row from a batch hands the row's caches back to it, so they
    reach the prompt cache (which already announced them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._ending: dict[str, Session] = {}

    def open(self, session: Session, limit: int) -> None:
        with self._lock:
            if session.session_id in self._sessions:
                raise SessionRefused("ALREADY_EXISTS",
                                     f"session {session.session_id[:40]!r} is already open")
            n = sum(1 for s in self._sessions.values() if s.shard == session.shard)
            if n >= limit:
                raise SessionRefused(
                    "RESOURCE_EXHAUSTED",
                    f"{n} sessions are open on shard {session.shard!r}, the most it was "
                    f"loaded for (--sessions {limit}); wait for one to end")
            self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Optional[Session]:
        with self._lock:
            return self._sessions.get(session_id)

    def end(self, session_id: str, reason: str = "") -> Optional[Session]:
        """Remove and mark it closed; None when there was no such session."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is not None:
                self._ending[session_id] = s
        if s is not None:
            s.closed = True
            s.end_reason = reason
        return s

    def holder(self, session_id: str) -> Optional[Session]:
        """The session holding these caches: open, or ended and not yet released."""
        with self._lock:
            return self._sessions.get(session_id) or self._ending.get(session_id)

    def released(self, session_id: str) -> None:
        with self._lock:
            self._ending.pop(session_id, None)

    def select(self, *, shard: Optional[str] = None, client_id: Optional[str] = None,
               idle_before: Optional[float] = None) -> list[Session]:
        with self._lock:
            out = list(self._sessions.values())
        if shard is not None:
            out = [s for s in out if s.shard == shard]
        if client_id is not None:
            out = [s for s in out if s.client_id == client_id]
        if idle_before is not None:
            out = [s for s in out if s.last_active + s.timeout_s < idle_before]
        return out

    def count(self, shard: str) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.shard == shard)
