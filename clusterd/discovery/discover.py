"""Find the nodes a command may use: mDNS plus `--peer` addresses, each
verified with an RPC (through a `probe` the caller passes in, so this module
does not depend on the servicer or on the channel code), duplicates reported.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

from .browse import browse
from .records import DiscoveredNode, node_from_info

# probe(address "host:port") -> a NodeInfo (or dict with its field names);
# raises with a message fit for the user when the node cannot be used.
Probe = Callable[[str], Any]


class PeerError(ValueError):
    pass


def parse_peer(text: str, default_port: Optional[int] = None) -> tuple[str, int]:
    """'host:port' (or 'host' with a default port) -> (host, port)."""
    host, sep, port_s = text.strip().rpartition(":")
    if not sep:
        host, port_s = text.strip(), ""
    host = host.strip("[]")
    if not port_s:
        if default_port is None:
            raise PeerError(f"--peer {text!r}: expected HOST:PORT")
        return host, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise PeerError(f"--peer {text!r}: port {port_s!r} is not a number") from None
    if not host or not 0 < port < 65536:
        raise PeerError(f"--peer {text!r}: expected HOST:PORT")
    return host, port


def _ipv4(host: str) -> str:
    """The IPv4 address of a peer's host name, to match it with mDNS records."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        return host


@dataclass(frozen=True)
class NodeReport:
    """One node found, and whether it can be used (`error` None) or why not."""

    node: DiscoveredNode
    info: Any = None          # what the probe returned (live NodeInfo)
    error: Optional[str] = None
    # "ok" | "unreachable" | "refused" (secret) | "incompatible" | "duplicate" | "failed"
    status: str = "ok"

    @property
    def usable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DuplicateId:
    node_id: str
    nodes: tuple[DiscoveredNode, ...]

    def message(self) -> str:
        """The one message every command gives for them."""
        where = ", ".join(n.label for n in self.nodes)
        return (
            f"{len(self.nodes)} different processes claim the same node id {self.node_id}: "
            f"{where}. Their clusterd folder was copied (or the machine cloned); run "
            "`clusterd up --new-id` on all but one of them. No command uses them until then."
        )


@dataclass(frozen=True)
class DiscoveryResult:
    reports: tuple[NodeReport, ...]
    duplicates: tuple[DuplicateId, ...]
    notes: tuple[str, ...] = ()  # e.g. mDNS could not run here

    def usable(self) -> list[DiscoveredNode]:
        return [r.node for r in self.reports if r.usable]

    def problems(self) -> list[str]:
        """Why some nodes cannot be used, one line each, for the user."""
        dup = {n.address for d in self.duplicates for n in d.nodes}
        lines = list(self.notes) + [d.message() for d in self.duplicates]
        lines += [r.error for r in self.reports if r.error and r.node.address not in dup]
        return lines


def find_duplicates(nodes: Iterable[DiscoveredNode]) -> tuple[DuplicateId, ...]:
    """Groups of distinct processes that share one node id (the rule every
    command follows: see `distinct_nodes`). One process is known by its boot
    id; where a node did not say it (an mDNS record never verified, an older
    node), one endpoint is one process."""
    groups: dict[str, list[DiscoveredNode]] = {}
    for node in nodes:
        if node.node_id:
            groups.setdefault(node.node_id, []).append(node)
    out = []
    for node_id, group in groups.items():
        distinct: list[DiscoveredNode] = []
        for node in group:
            if not any(_same_node(node, seen) for seen in distinct):
                distinct.append(node)
        if len(distinct) > 1:
            out.append(DuplicateId(node_id, tuple(distinct)))
    return tuple(out)


def _endpoints(n: DiscoveredNode) -> set[str]:
    return {f"{h}:{n.port}" for h in (n.addresses or (n.host,))}


def _same_node(a: DiscoveredNode, b: DiscoveredNode) -> bool:
    if a.boot and b.boot:
        return a.boot == b.boot  # each process says who it is
    if a.instance and a.instance == b.instance and a.boot == b.boot:
        return True
    # One endpoint is one process: a peer entry and a record listing its
    # address, or a restarted node and its old record still in some cache.
    return bool(_endpoints(a) & _endpoints(b))


def same_process_twice(nodes: Sequence[DiscoveredNode]) -> list[tuple[DiscoveredNode, DiscoveredNode]]:
    """Pairs (first, again) of entries that are one process reached under two
    addresses (same node id and boot id)."""
    seen: dict[tuple[str, str], DiscoveredNode] = {}
    out = []
    for n in nodes:
        if not (n.node_id and n.boot):
            continue
        first = seen.setdefault((n.node_id, n.boot), n)
        if first is not n and first.address != n.address:
            out.append((first, n))
    return out


def distinct_nodes(nodes: Sequence[DiscoveredNode]) -> Optional[str]:
    """Why a list of nodes given for a ring (`--peer`, in order) is not one
    entry per node, or None. Two processes with one node id: the duplicate
    message, and neither is used; one process under two addresses: give it once."""
    dups = find_duplicates(nodes)
    if dups:
        return " ".join(d.message() for d in dups)
    twice = same_process_twice(nodes)
    if twice:
        first, again = twice[0]
        return (f"{first.address} and {again.address} are the same node "
                f"({first.name or first.node_id}, one process reached under two addresses): "
                "give it once")
    return None


def _merge_same_process(reports: list[NodeReport]) -> tuple[list[NodeReport], list[str]]:
    """One process reached under several addresses is one node: keep its
    first report, with every address it answered at."""
    kept: dict[tuple[str, str], int] = {}
    out: list[NodeReport] = []
    notes: list[str] = []
    for r in reports:
        key = (r.node.node_id, r.node.boot)
        if r.info is None or not all(key):
            out.append(r)
            continue
        if key not in kept:
            kept[key] = len(out)
            out.append(r)
            continue
        first = out[kept[key]]
        addresses = tuple(dict.fromkeys(first.node.addresses + r.node.addresses
                                        + (r.node.host,)))
        out[kept[key]] = replace(first, node=replace(first.node, addresses=addresses))
        notes.append(f"node {first.node.label} also answers at {r.node.address} "
                     "(the same process): counted once")
    return out, notes


def _status_of(exc: Exception) -> str:
    """Classify a probe failure by its gRPC status code, when it has one."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    name = getattr(code, "name", "")
    if name == "UNAUTHENTICATED":
        return "refused"
    if name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return "unreachable"
    return "failed"


def _verify(node: DiscoveredNode, probe: Probe, protocol_version: Optional[int]) -> NodeReport:
    """Try each advertised address in turn; the first that answers is the one
    to dial (a Mac on Wi-Fi and Ethernet advertises both)."""
    report = NodeReport(node, None, f"node {node.label}: no address", "unreachable")
    for host in node.addresses or (node.host,):
        address = f"{host}:{node.port}"
        try:
            info = probe(address)
        except Exception as e:  # the probe's message is meant for the user
            error = str(e) or f"node {node.label} failed: {type(e).__name__}"
            # The probe knows only the address; the user knows the name.
            error = error.replace(f"node {address} ({address})", f"node {address}")
            if node.name and node.name not in error:
                error = error.replace(f"node {address}", f"node {node.name} ({address})")
            # A refusal beats "unreachable" from another address: it is the real problem.
            if report.status != "refused":
                report = NodeReport(node, None, error, _status_of(e))
            continue
        live = node_from_info(info, host, node.port, base=node)
        if node.node_id and live.node_id != node.node_id:
            return NodeReport(live, info, f"node at {address} answers with id {live.node_id}, "
                                          f"but advertised {node.node_id}", "failed")
        if protocol_version is not None and live.protocol_version != protocol_version:
            return NodeReport(
                live, info,
                f"node {live.label} speaks protocol v{live.protocol_version}, this clusterd "
                f"speaks v{protocol_version}: run the same clusterd version on every Mac",
                "incompatible",
            )
        if live.state == "stopping":
            return NodeReport(live, info, f"node {live.label} is shutting down", "unreachable")
        return NodeReport(live, info, None)
    if node.tls and report.status == "unreachable":
        report = replace(report, error=f"{report.error} (it serves TLS: give this Mac the "
                                       "cluster CA as <clusterd folder>/tls/ca.pem or $CLUSTERD_TLS_CA)")
    return report


def discover(
    probe: Probe,
    *,
    timeout: float = 2.0,
    interfaces: Optional[Sequence[str]] = None,
    peers: Sequence[str] = (),
    mdns: bool = True,
    default_port: Optional[int] = None,
    protocol_version: Optional[int] = None,
    expect: Optional[int] = None,
) -> DiscoveryResult:
    """Browse mDNS for `timeout` seconds (unless `mdns` is False), add the
    `peers`, verify every node with `probe`, and report duplicates."""
    found: list[DiscoveredNode] = []
    known: set[str] = set()
    notes: list[str] = []
    advertised: list[DiscoveredNode] = []
    if mdns:
        try:
            advertised = browse(timeout, interfaces, expect=expect)
        except OSError as e:  # no multicast-capable interface, socket refused...
            notes.append(f"mDNS could not run here ({e}); use --peer HOST:PORT")
    for node in advertised:
        if not _endpoints(node) & known:  # else a stale record of a live endpoint
            found.append(node)
            known |= _endpoints(node)
    for text in dict.fromkeys(peers):  # same order, no repeats
        host, port = parse_peer(text, default_port)
        ip = _ipv4(host)
        if f"{ip}:{port}" in known:
            continue  # already found by mDNS
        known.add(f"{ip}:{port}")
        found.append(DiscoveredNode(host=ip, port=port, addresses=(ip,), source="peer", name=""))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(found)))) as pool:
        reports = list(pool.map(lambda n: _verify(n, probe, protocol_version), found))
    reports, merged = _merge_same_process(reports)
    notes += merged
    duplicates = find_duplicates(r.node for r in reports)
    dup_addresses = {n.address for d in duplicates for n in d.nodes}
    reports = [
        replace(r, status="duplicate",
                error=r.error or f"node {r.node.label}: duplicate node id {r.node.node_id}")
        if r.node.address in dup_addresses else r
        for r in reports
    ]
    reports.sort(key=lambda r: (r.node.name or "~", r.node.address))
    return DiscoveryResult(tuple(reports), duplicates, tuple(notes))
