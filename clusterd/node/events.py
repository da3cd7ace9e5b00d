"""Token events to coordinators: one queue per coordinator (client id),
drained by its single Events stream, whatever the number of its sessions.
A queue exists from the client's first session (events published before
its stream attaches wait there) until its stream ends or its last session
is released; events for a client without one are dropped, so a vanished
coordinator leaves nothing behind."""

from __future__ import annotations

import queue
import threading
from typing import Optional

from clusterd.wire import clusterd_pb2 as pb

# Events a coordinator may leave unread before its queue stops growing:
# far more than any healthy stream lags, small next to the node's memory.
MAX_PENDING = 200_000


class EventHub:
    def __init__(self) -> None:
        self._queues: dict[str, "queue.Queue[pb.TokenEvent]"] = {}
        self._attached: dict[str, object] = {}
        self._holding: dict[str, int] = {}  # client -> its sessions not yet released
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
            self._queue(client_id)

    def released(self, client_id: str) -> None:
        """One of its sessions is gone (or was refused): after the last, and
        with no stream reading, its queue goes."""
        with self._lock:
            n = self._holding.pop(client_id, 0) - 1
            if n > 0:
                self._holding[client_id] = n
            elif client_id not in self._attached:
                self._queues.pop(client_id, None)

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
            return self._queue(client_id)

    def detach(self, client_id: str, token: object) -> bool:
        """True when `token` was still the client's stream: it is gone now."""
        with self._lock:
            if self._attached.get(client_id) is not token:
                return False
            del self._attached[client_id]
            self._queues.pop(client_id, None)
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
