"""Browsing `_clusterd._tcp.local.`: the nodes on the network right now.

A node leaves the list when it unregisters (mDNS goodbye, immediate) or, with
a `health` check, when it stops answering it (a crash or a cable pulled sends
no goodbye, and mDNS caches keep records for minutes).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from .interfaces import rank_addresses
from .records import SERVICE_TYPE, DiscoveredNode, node_from_txt

log = logging.getLogger(__name__)

HealthCheck = Callable[[DiscoveredNode], None]  # raises when the node is not healthy


class NodeBrowser(ServiceListener):
    """Keeps the current list of advertised nodes.

    `health` (optional) is called every `health_interval` seconds for each
    node, from a worker thread; after `failures_to_drop` failures in a row the
    node leaves the list until it re-announces. `on_change` gets the new list
    whenever it changes.
    """

    def __init__(
        self,
        *,
        interfaces: Optional[Sequence[str]] = None,
        health: Optional[HealthCheck] = None,
        health_interval: float = 1.0,
        failures_to_drop: int = 2,
        on_change: Optional[Callable[[list[DiscoveredNode]], None]] = None,
        resolve_timeout: float = 2.0,
    ) -> None:
        self._interfaces = list(interfaces) if interfaces else None
        self._health = health
        self._health_interval = health_interval
        self._failures_to_drop = failures_to_drop
        self._on_change = on_change
        self._resolve_ms = int(resolve_timeout * 1000)
        self._nodes: dict[str, DiscoveredNode] = {}   # by mDNS instance name
        self._failures: dict[str, int] = {}
        self._lost: dict[str, DiscoveredNode] = {}    # dropped by health, record still cached
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._zc: Optional[Zeroconf] = None
        self._browser: Optional[ServiceBrowser] = None
        self._monitor: Optional[threading.Thread] = None

    # -- lifecycle

    def start(self) -> "NodeBrowser":
        self._zc = Zeroconf(
            interfaces=self._interfaces or InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, listener=self)
        if self._health is not None:
            self._monitor = threading.Thread(target=self._watch_health, name="clusterd-health", daemon=True)
            self._monitor.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._browser is not None:
            self._browser.cancel()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self._zc is not None:
            self._zc.close()
        self._zc = self._browser = self._monitor = None

    def __enter__(self) -> "NodeBrowser":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what callers read

    def nodes(self) -> list[DiscoveredNode]:
        with self._cond:
            return sorted(self._nodes.values(), key=lambda n: (n.name, n.address))

    def wait_for(self, predicate: Callable[[list[DiscoveredNode]], bool], timeout: float) -> bool:
        """Block until predicate(nodes) holds or timeout passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(sorted(self._nodes.values(), key=lambda n: (n.name, n.address))):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    # -- zeroconf callbacks (run on the browser's own thread)

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self._cond:
            gone = self._nodes.pop(name, None)
            self._lost.pop(name, None)
            self._failures.pop(name, None)
        if gone is not None:
            log.info("node %s unregistered", gone.label)
            self._changed()

    def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = ServiceInfo(type_, name)
        if not info.request(zc, self._resolve_ms):
            log.debug("could not resolve %s", name)
            return
        addrs = rank_addresses(info.parsed_addresses(), self._interfaces)
        if not addrs or info.port is None:
            return
        node = node_from_txt(info.properties or {}, addrs, info.port, name)
        with self._cond:
            lost = self._lost.get(name)
            if lost is not None and lost.boot == node.boot and lost.addresses == node.addresses:
                return  # the same dead process's cached record; stays dropped
            self._lost.pop(name, None)
            self._failures.pop(name, None)
            if self._nodes.get(name) == node:
                return
            self._nodes[name] = node
        self._changed()

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
        if self._on_change is not None:
            try:
                self._on_change(self.nodes())
            except Exception:  # a caller's bug must not kill the browser thread
                log.exception("on_change callback failed")

    # -- health

    def _check(self, name: str, node: DiscoveredNode) -> tuple[str, DiscoveredNode, bool]:
        try:
            self._health(node)  # type: ignore[misc]
            return name, node, True
        except Exception as e:  # any failure counts: unreachable, refused, timed out
            log.debug("health check of %s failed: %s", node.label, e)
            return name, node, False

    def _watch_health(self) -> None:
        # Dropped nodes are still checked: one that answers again (a network
        # blip, not a crash) comes back without having to re-announce.
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="clusterd-health") as pool:
            while not self._stop.wait(self._health_interval):
                with self._cond:
                    current = list(self._nodes.items()) + list(self._lost.items())
                changed = False
                for name, node, ok in pool.map(lambda item: self._check(*item), current):
                    with self._cond:
                        if self._lost.get(name) == node:
                            if ok:
                                self._nodes[name] = self._lost.pop(name)
                                log.info("node %s answers again", node.label)
                                changed = True
                            continue
                        if self._nodes.get(name) != node:
                            continue  # re-announced meanwhile; judge the new one next round
                        if ok:
                            self._failures.pop(name, None)
                            continue
                        self._failures[name] = self._failures.get(name, 0) + 1
                        if self._failures[name] >= self._failures_to_drop:
                            self._lost[name] = self._nodes.pop(name)
                            self._failures.pop(name, None)
                            log.warning("node %s stopped answering health checks", node.label)
                            changed = True
                if changed:
                    self._changed()


def browse(
    timeout: float = 2.0,
    interfaces: Optional[Sequence[str]] = None,
    *,
    expect: Optional[int] = None,
) -> list[DiscoveredNode]:
    """The nodes that answer within `timeout` seconds (sooner once `expect`
    nodes are seen)."""
    with NodeBrowser(interfaces=interfaces) as browser:
        if expect is not None:
            browser.wait_for(lambda nodes: len(nodes) >= expect, timeout)
        else:
            time.sleep(timeout)
        return browser.nodes()
