"""One decode hop on its own, next to a plain TCP round trip of the same bytes.

Measured in the same run and interleaved so load hits all:
  tcp          a length-prefixed message of the hidden vector's bytes to another
               process and a one-byte answer back (TCP_NODELAY, loopback): the floor.
  pipeline     the cost of one hop inside a running ring (stages talk over their
               persistent links): decode on the hop model
               split over 3 daemons minus the same layers in 1 daemon, per hop.
               Clock-free (every interval is measured on the coordinator's clock),
               so it also holds between Macs.
"""

from __future__ import annotations

import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.bench.hop_model import HOP_LAYERS, R1_HIDDEN, build_hop_model
from clusterd.bench.layouts import ClusterdLayout, LayoutSpec
from clusterd.bench.stats import latency_summary
from clusterd.bench.transports import TransportPeer
from clusterd.local_cluster import LocalCluster
from clusterd.wire.tensors import to_wire

Progress = Callable[[str], None]

# The same bytes between two plain processes, every way considered for the hop.
TRANSPORTS = {
    "tcp_one_way": lambda t, p, n, s: t.tcp_one_way(p, n, s),
    "grpc_unary_round_trip": lambda t, p, n, s: t.unary(p, n, s),
    "grpc_unary_one_way": lambda t, p, n, s: t.unary_one_way(p, n, s, "blocking"),
    "grpc_unary_one_way_with_auth": lambda t, p, n, s: t.unary_one_way_authed(p, n, s),
    "grpc_unary_one_way_future": lambda t, p, n, s: t.unary_one_way(p, n, s, "future"),
    "grpc_unary_one_way_sender_thread": lambda t, p, n, s: t.unary_one_way(p, n, s, "thread"),
    "grpc_stream_one_way": lambda t, p, n, s: t.stream_one_way(p, n, s),
    "grpc_bidi_round_trip": lambda t, p, n, s: t.bidi(p, n, s),
}


class TcpPeer:
    """The plain-TCP baseline peer: another process, answering each message."""

    def __init__(self, host: str = "127.0.0.1"):
        self.proc = subprocess.Popen([sys.executable, "-m", "clusterd.bench.tcp_ack", host],
                                     stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trips(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        msg = struct.pack("<I", len(payload)) + payload
        ack = bytearray(1)
        out = []
        for _ in range(count):
            t = time.perf_counter()
            self.sock.sendall(msg)
            self.sock.recv_into(ack)
            out.append(time.perf_counter() - t)
            time.sleep(pace_s)
        return out

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


def _prompt(n: int, vocab: int) -> list[int]:
    return [(i * 37 + 11) % (vocab - 2) + 2 for i in range(n)]


def measure_hop(workdir: Path, *, rounds: int = 5, count: int = 200, pace_s: float = 0.002,
                decode_tokens: int = 64, hidden: int = R1_HIDDEN, dtype: str = "float32",
                progress: Progress = lambda text: None) -> dict:
    """The hop report: TCP vs the in-pipeline hop (and plain gRPC), interleaved in rounds.
    dtype "bfloat16" is what a real R1 hop carries (2 bytes a value)."""
    import mlx.core as mx

    progress(f"building the hop model ({dtype})")
    model = build_hop_model(hidden, dtype=dtype)
    h = mx.random.normal((1, 1, hidden), key=mx.random.key(0)).astype(getattr(mx, dtype))
    mx.eval(h)
    payload = to_wire(h).data  # the bytes a hop carries, bf16 as its 2-byte pattern
    tcp_s: list[float] = []
    raw: dict[str, list[float]] = {k: [] for k in TRANSPORTS}
    one: list[float] = []  # per-token intervals, all layers on one daemon
    three: list[float] = []  # the same layers on three daemons
    prompt = _prompt(16, 256)
    progress("starting 4 daemons and a TCP peer")
    with LocalCluster(1 + HOP_LAYERS, workdir=workdir / "hop-nodes") as cluster:
        single = ClusterdLayout(model, cluster.addresses[:1], LayoutSpec(1, (HOP_LAYERS,), "given"))
        ring = ClusterdLayout(model, cluster.addresses[1:], LayoutSpec(3, (1, 1, 1), "given"))
        tcp = TcpPeer()
        transports = TransportPeer()
        try:
            for gen in (single, ring):  # warm-up: first-call costs stay out of the numbers
                gen.generate(prompt, 8, 2048)
            tcp.round_trips(payload, 20, pace_s)
            for r in range(rounds):
                progress(f"round {r + 1}/{rounds}: TCP")
                tcp_s += tcp.round_trips(payload, count, pace_s)
                progress(f"round {r + 1}/{rounds}: plain gRPC unary / stream")
                for key, measure in TRANSPORTS.items():
                    raw[key] += measure(transports, payload, count, pace_s)
                progress(f"round {r + 1}/{rounds}: decode on 1 and 3 daemons")
                one += single.generate(prompt, decode_tokens, 2048).intervals
                three += ring.generate(prompt, decode_tokens, 2048).intervals
        finally:
            tcp.close()
            transports.close()
            single.close()
            ring.close()
    report = hop_report(len(payload), tcp_s, one, three, hops=3, hidden=hidden)
    report["dtype"] = dtype
    report["plain_transports"] = {k: latency_summary(v) for k, v in raw.items()}
    report["notes"].append(
        "plain_transports: the same bytes between two plain Python processes (no clusterd "
        "code), over gRPC unary calls and streams: what the stages' raw links replace")
    return report


def hop_report(payload_bytes: int, tcp_s: Sequence[float], one: Sequence[float],
               three: Sequence[float], *, hops: int, hidden: int) -> dict:
    base = statistics.median(one) if one else float("nan")
    # Each token's extra time on 3 daemons over the 1-daemon median, per hop.
    per_hop = [(x - base) / hops for x in three]
    tcp = latency_summary(tcp_s)
    pipe = latency_summary(per_hop)
    return {
        "hidden": hidden,
        "payload_bytes": payload_bytes,
        "tcp_round_trip": tcp,
        "pipeline_hop": pipe,
        "decode_interval_1_daemon": latency_summary(one),
        "decode_interval_3_daemons": latency_summary(three),
        "pipeline_hop_over_tcp_p50": pipe["p50_ms"] / tcp["p50_ms"] if tcp["n"] else None,
        "notes": [
            "tcp: length-prefixed message of the same bytes to another process, 1-byte answer",
            "pipeline_hop: (3-daemon decode interval - 1-daemon median) / 3 hops, hop model",
        ],
    }


def pace_for(step_s: Optional[float]) -> float:
    """Probes wait about one decode step, so the stage's compute for the
    previous probe is over before the next one is timed."""
    return min(0.2, max(0.002, step_s or 0.0))
