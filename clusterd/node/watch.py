"""Re-announce a node when its usable memory moves: `sudo sysctl
iogpu.wired_limit_mb=N` on a Mac (or other programs on a Linux box) changes
what the node can hold, and planners read that from its mDNS record before
any RPC. A thread re-probes every few seconds; a move of more than a GiB (5%
on small machines, never under 256 MiB) updates the service's figures and
calls the daemon's re-announce (which sends only when the record changed)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("clusterd.node")

INTERVAL_S = 5.0
MOVE_BYTES = 2**30      # a raised wired limit moves by GiBs
MIN_MOVE_BYTES = 256 * 2**20
MOVE_SHARE = 0.05       # available memory on Linux wanders by a few percent


def moved(old: int, new: int) -> bool:
    return abs(new - old) > max(MIN_MOVE_BYTES, min(MOVE_BYTES, MOVE_SHARE * old))


class ResourceWatch:
    """`service.resources` is replaced by `probe()`'s answer when usable
    memory moved; then `on_change()` re-announces."""

    def __init__(self, service: Any, probe: Callable[[], Any], on_change: Callable[[], None],
                 stop: threading.Event, interval_s: float = INTERVAL_S):
        self._service = service
        self._probe = probe
        self._on_change = on_change
        self._stop = stop
        self._interval_s = interval_s

    def check(self) -> bool:
        """One look; whether it re-announced."""
        try:
            new = self._probe()
        except Exception as e:  # a probe that fails once must not end the watch
            log.debug("resource probe failed: %s", e)
            return False
        old = self._service.resources
        if not moved(old.usable_bytes, new.usable_bytes):
            return False
        log.info("usable memory moved from %.1f to %.1f GiB; re-announcing",
                 old.usable_bytes / 2**30, new.usable_bytes / 2**30)
        self._service.resources = new
        self._on_change()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check()

    def start(self) -> "ResourceWatch":
        threading.Thread(target=self._run, name="resource-watch", daemon=True).start()
        return self
