"""Token events to coordinators: one queue per coordinator (client id),
drained by its single Events stream, whatever the number of its sessions.
A queue exists from the client's first session (events published before
its stream attaches wait there) until its stream ends, or its last session
is released and nothing waits in it. A queue left with unread events and
no stream is kept `UNREAD_KEEP_S` for a stream to come and read them, then
swept; events for a client without a queue are dropped. So a vanished
coordinator leaves nothing behind for long."""

from __future__ import annotations

import queue
import threading
import time
from typing import Optional

from clusterd.wire import clusterd_pb2 as pb

# Events a coordinator may leave unread before its queue stops growing:
# far more than any healthy stream lags, small next to the node's memory.
MAX_PENDING = 200_000
# How long unread events wait for a stream that has not attached (the
# default session timeout: a coordinator silent that long is gone).
UNREAD_KEEP_S = 300.0


class EventHub:
    def __init__(self) -> None:
        self._queues: dict[str, "queue.Queue[pb.TokenEvent]"] = {}
        self._attached: dict[str, object] = {}
        self._holding: dict[str, int] = {}  # client -> its sessions not yet released
        self._unread: dict[str, float] = {}  # client -> when it was left without readers
        self._lock = threading.Lock()

    def _queue(self, client_id: str) -> "queue.Queue[pb.TokenEvent]":
        q = self._queues.get(client_id)
        if q is None:
            q = self._queues[client_id] = queue.Queue(MAX_PENDING)
        return q

    def opened(self, client_id: str) -> None:
        """A session of the client is opening: its events are kept."""
        with self._lock:
            self._holding[client_id] = self._holding.get(client_id, 0) + 1
            self._unread.pop(client_id, None)
            self._queue(client_id)

    def released(self, client_id: str, now: Optional[float] = None) -> None:
        """One of its sessions is gone (or was refused): after the last, and
        with no stream reading, its queue goes, or waits to be swept when
        events in it (the session's last ones) are still unread."""
        with self._lock:
            n = self._holding.pop(client_id, 0) - 1
            if n > 0:
                self._holding[client_id] = n
                return
            q = self._queues.get(client_id)
            if q is None or client_id in self._attached:
                return
            if q.empty():
                del self._queues[client_id]
            else:
                self._unread[client_id] = time.monotonic() if now is None else now

    def sweep(self, now: Optional[float] = None) -> int:
        """Drop queues whose events waited `UNREAD_KEEP_S` for no stream."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [c for c, t in self._unread.items() if now - t >= UNREAD_KEEP_S]
            for c in gone:
                del self._unread[c]
                self._queues.pop(c, None)
        return len(gone)

    def publish(self, client_id: str, event: pb.TokenEvent) -> bool:
        """False when nobody will read it: the client is gone, or its queue
        is full (it stopped reading)."""
        with self._lock:
            q = self._queues.get(client_id)
        if q is None:
            return False
        try:
            q.put_nowait(event)
            return True
        except queue.Full:
            return False

    def attach(self, client_id: str, token: object) -> "queue.Queue[pb.TokenEvent]":
        """The stream `token` now reads `client_id`'s events (a newer stream
        of the same client takes over from an older one)."""
        with self._lock:
            self._attached[client_id] = token
            self._unread.pop(client_id, None)
            return self._queue(client_id)

    def detach(self, client_id: str, token: object) -> bool:
        """True when `token` was still the client's stream: it is gone now."""
        with self._lock:
            if self._attached.get(client_id) is not token:
                return False
            del self._attached[client_id]
            self._queues.pop(client_id, None)
            self._unread.pop(client_id, None)
            return True

    def is_attached(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._attached

    def clients(self) -> int:
        """Clients whose events are kept (what a node holds for them)."""
        with self._lock:
            return len(self._queues)

    def get(self, q: "queue.Queue[pb.TokenEvent]", timeout: float) -> Optional[pb.TokenEvent]:
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None
