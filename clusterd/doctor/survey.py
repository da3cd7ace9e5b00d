"""What `clusterd doctor` looks at, gathered once: this Mac's interfaces and
secret, the nodes mDNS shows and the `--peer` nodes, each asked for Health and
Info, its clock, the local interface that reaches it and whether its port
speaks TLS."""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from clusterd.discovery import DiscoveryResult, NodeReport, discover
from clusterd.discovery.interfaces import interface_kinds, local_ipv4
from clusterd.node.probe import local_address_to, serves_tls
from clusterd.proofs import REPLAY_WINDOW_S
from clusterd.security import ClientSecurity, fingerprint
from clusterd.wire import PROTOCOL_VERSION

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class NodeSeen:
    report: NodeReport
    clock_offset_s: Optional[float] = None  # its clock minus this Mac's
    local_address: Optional[str] = None     # this Mac's address on the path to it
    local_interface: Optional[str] = None
    serves_tls: Optional[bool] = None       # None: no TCP connection

    @property
    def node(self):
        return self.report.node

    @property
    def label(self) -> str:
        return self.node.label

    @property
    def name(self) -> str:
        return self.node.name or self.node.address


@dataclass(frozen=True)
class Survey:
    result: DiscoveryResult
    nodes: tuple[NodeSeen, ...]
    mdns: bool
    peers: tuple[str, ...]
    interfaces: tuple[tuple[str, str, int], ...]  # (name, address, prefix) of this Mac
    client_tls: bool
    secret_fingerprint: Optional[str]
    window_s: float = REPLAY_WINDOW_S
    kinds: Mapping[str, str] = field(default_factory=dict)  # en1 -> Wi-Fi (macOS)

    def interface_of(self, address: str) -> Optional[str]:
        return interface_for(address, self.interfaces, self.kinds)


def interface_for(address: str, interfaces: Sequence[tuple[str, str, int]],
                  kinds: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The local interface whose subnet holds `address`: "en1 Wi-Fi (192.168.1.20)"."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    for name, addr, prefix in interfaces:
        if addr == address or ip in ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False):
            kind = f" {kinds[name]}" if kinds and name in kinds else ""
            return f"{name}{kind} ({addr})"
    return None


class _Prober:
    """discover()'s probe: Health (timed, for the clock), then Info, with this
    Mac's secret and TLS files, as every command calls nodes."""

    def __init__(self, timeout: float = 3.0):
        self._timeout = timeout
        self.offsets: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str):
        from clusterd.coordinator.peers import PeerHandle

        peer = PeerHandle(address)
        try:
            t0 = time.time()
            health = peer.health(timeout=self._timeout)
            t1 = time.time()
            if health.unix_time:
                with self._lock:
                    self.offsets[address] = health.unix_time - (t0 + t1) / 2
            return peer.info()
        finally:
            peer.close()


def survey(*, peers: Sequence[str] = (), interfaces: Optional[Sequence[str]] = None,
           mdns: bool = True, browse_timeout: float = 2.0) -> Survey:
    security = ClientSecurity.from_environment()
    prober = _Prober()
    result = discover(prober, timeout=browse_timeout, interfaces=interfaces, peers=peers,
                      mdns=mdns, default_port=DEFAULT_PORT, protocol_version=PROTOCOL_VERSION)
    local = tuple(local_ipv4())
    kinds = interface_kinds()

    def look(r: NodeReport) -> NodeSeen:
        host, port = r.node.host, r.node.port
        try:
            mine = local_address_to(host, port, 3.0)
        except OSError:
            mine = None
        return NodeSeen(r, prober.offsets.get(r.node.address), mine,
                        interface_for(mine, local, kinds) if mine else None,
                        serves_tls(host, port) if mine else None)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(result.reports)))) as pool:
        seen = tuple(pool.map(look, result.reports))
    return Survey(result, seen, mdns, tuple(peers), local, security.tls.client_enabled,
                  fingerprint(security.secret) if security.secret else None, kinds=kinds)
