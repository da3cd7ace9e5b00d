"""Ring neighbours: every node must reach the one after it (and the last the
first), because tokens travel from stage to stage, not through this Mac. Each
node probes its neighbour (the Probe RPC) with a hop-sized payload for the
round trip and a larger one for throughput; what it measured goes to the
links file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from clusterd.doctor.findings import INFO, PROBLEM, WARNING, Finding
from clusterd.doctor.links import MeasuredLink
from clusterd.doctor.network import SET_TIME, skew_from
from clusterd.doctor.survey import NodeSeen
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc
from clusterd.wire.channel import open_channel

HOP_PAYLOAD = 7168 * 2      # one R1 hidden state in bf16
BULK_PAYLOAD = 4 * 2**20    # enough to see the link's throughput, not its latency
SLOW_RTT_MS = 10.0          # Wi-Fi-like (with the RPC stack): every token pays it once per hop


@dataclass(frozen=True)
class Hop:
    src: NodeSeen
    dst: NodeSeen
    rtt: Optional[pb.ProbeReply] = None
    bulk: Optional[pb.ProbeReply] = None
    error: str = ""          # the probe itself could not be asked for

    @property
    def ok(self) -> bool:
        return not self.error and self.rtt is not None and self.rtt.reachable


def ring_order(nodes: Sequence[NodeSeen], peers: Sequence[str]) -> list[NodeSeen]:
    """The usable nodes in the order `run` would use them: --peer order when
    every one was given, else by name (as discovery lists them)."""
    usable = [n for n in nodes if n.report.usable]
    position = {p: i for i, p in enumerate(peers)}
    if usable and all(n.node.address in position for n in usable):
        return sorted(usable, key=lambda n: position[n.node.address])
    return usable


def _probe(src: NodeSeen, dst: NodeSeen, rounds: int, timeout: float) -> Hop:
    channel = open_channel(src.node.address)
    try:
        stub = rpc.NodeStub(channel)

        def ask(payload: int, n: int) -> pb.ProbeReply:
            return stub.Probe(pb.ProbeRequest(address=dst.node.address, payload_bytes=payload,
                                              rounds=n, timeout_seconds=timeout),
                              timeout=timeout + 5)

        rtt = ask(HOP_PAYLOAD, rounds)
        bulk = ask(BULK_PAYLOAD, 3) if rtt.reachable else None
        return Hop(src, dst, rtt, bulk)
    except grpc.RpcError as e:
        what = ("is an older clusterd without the Probe call"
                if e.code() == grpc.StatusCode.UNIMPLEMENTED else f"failed: {e.details()}")
        return Hop(src, dst, error=f"{src.name} could not be asked to probe {dst.name}: it {what}")
    finally:
        channel.close()


def probe_ring(ring: Sequence[NodeSeen], *, rounds: int = 20, timeout: float = 10.0) -> list[Hop]:
    if len(ring) < 2:
        return []
    # The last stage sends each token back to the first: the ring closes.
    pairs = [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        return list(pool.map(lambda p: _probe(p[0], p[1], rounds, timeout), pairs))


def ring_findings(hops: Sequence[Hop]) -> list[Finding]:
    out = []
    for h in hops:
        a, b = h.src, h.dst
        if h.error:
            out.append(Finding(WARNING, "ring", h.error,
                               f"install this clusterd version on {a.name}", (a.name,)))
            continue
        r = h.rtt
        if not r.reachable:
            out.append(Finding(PROBLEM, "ring",
                               f"{a.name} cannot reach {b.name} at {b.node.address}, though this "
                               f"Mac reaches both: {r.error}", _fix(h), (a.name, b.name)))
            continue
        if not r.link_reachable:
            out.append(Finding(PROBLEM, "ring",
                               f"{a.name} reaches {b.name}'s gRPC port but not its stage link: "
                               f"{r.link_error or 'no link port'}",
                               f"allow TCP port {r.link_port} to {b.name} in its firewall (by "
                               "default a node's link port is its gRPC port + 1; `clusterd up "
                               "--link-port` sets it)", (a.name, b.name)))
            continue
        bulk = h.bulk.throughput_mbps if h.bulk is not None and h.bulk.reachable else r.throughput_mbps
        text = (f"{a.name} -> {b.name}: round trip {r.rtt_p50_ms:.2f} ms (p99 {r.rtt_p99_ms:.2f}), "
                f"{bulk:.0f} Mb/s, leaving {a.name} from {r.local_address}"
                + (" over TLS" if r.tls else ""))
        if r.rtt_p50_ms > SLOW_RTT_MS:
            out.append(Finding(WARNING, "ring", text + ": a slow link (Wi-Fi?); every token pays "
                               "it once per hop",
                               "join these Macs by Ethernet or Thunderbolt Bridge and start "
                               "`clusterd up --interface` on that interface", (a.name, b.name)))
        else:
            out.append(Finding(INFO, "ring", text, "", (a.name, b.name)))
    return out


def _fix(h: Hop) -> str:
    a, b, r = h.src, h.dst, h.rtt
    if r.error_code == "UNAUTHENTICATED":
        if skew_from(r.error) is not None:
            return f"the clocks of {a.name} and {b.name} differ: {SET_TIME}"
        return (f"{a.name} and {b.name} hold different cluster secrets: copy one to the other "
                f"(`clusterd secret | ssh {b.node.host} clusterd secret --set -` from {a.name}) "
                "and restart `clusterd up`")
    if "TLS" in r.error:
        return ("one TLS setting for the whole cluster: copy ~/.clusterd/tls to every Mac (or "
                "remove it from every one), then restart `clusterd up`")
    left = f", it left from {r.local_address}" if r.local_address else ""
    return (f"let {a.name} connect to {b.name}'s port {b.node.port}: check {b.name}'s firewall "
            f"(System Settings > Network > Firewall) and that {a.name} has a route to "
            f"{b.node.host}{left}; Macs on different networks need one they share, e.g. "
            "Thunderbolt Bridge")


def measured_links(hops: Sequence[Hop]) -> list[MeasuredLink]:
    """Links are keyed by node name: pairs whose names repeat cannot be told
    apart and are left out (network_findings says to rename such nodes)."""
    out = []
    seen: set[tuple[str, str]] = set()
    for h in hops:
        pair = (h.src.name, h.dst.name)
        if h.ok and pair[0] != pair[1] and pair not in seen:
            seen.add(pair)
            bulk = h.bulk if h.bulk is not None and h.bulk.reachable else h.rtt
            out.append(MeasuredLink(h.src.name, h.dst.name, h.rtt.rtt_p50_ms,
                                    bulk.throughput_mbps))
    return out
