"""The Probe RPC (a part of NodeService): this node calls another node the way
it calls its next stage, and reports what it saw. `clusterd doctor` asks each
node to probe its ring neighbour, so it checks the path tokens take from stage
to stage, not only the path from the coordinator.

A probe is: a TCP connection (the local address it leaves from says which
interface the path uses), Hello (who answers), Health (its clock), then timed
round trips of a payload. A round trip is a Forward of a hidden-state tensor
of the payload's size to a shard that does not exist: the same channel (with
the cluster secret) and the same parsing as a coordinator's prompt chunk; the
probed node reads it all, then refuses it, which here means delivered.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import statistics
import time
from typing import Callable, Optional

import grpc

from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.node")

MAX_PAYLOAD = 64 * 2**20
MAX_ROUNDS = 1000
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 120.0
# The probed node read the whole message and refused it as a hop: delivered.
DELIVERED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.INVALID_ARGUMENT}


class ProbeFailed(Exception):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"probe address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def local_address_to(host: str, port: int, timeout: float) -> str:
    """The address this machine uses to reach host:port (its interface on
    the path), by opening a TCP connection there."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return sock.getsockname()[0]


def serves_tls(host: str, port: int, timeout: float = 3.0) -> Optional[bool]:
    """Whether host:port answers a TLS handshake (True), does not (False),
    or cannot be asked (None: no TCP connection). The certificate is not
    checked: this only tells TLS from plaintext gRPC."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(sock, server_hostname="clusterd"):
            return True
    except (ssl.SSLError, OSError):
        return False
    finally:
        sock.close()


def _describe(e: grpc.RpcError, who: str, tls: bool, host: str, port: int) -> ProbeFailed:
    code = e.code()
    details = e.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ProbeFailed(f"{who} refused this node's call: {details}", code.name)
    if code == grpc.StatusCode.UNAVAILABLE:
        other = serves_tls(host, port)
        if other is not None and other != tls:
            return ProbeFailed(
                f"{who} {'serves TLS' if other else 'serves plaintext'}, but this node calls "
                f"{'with' if tls else 'without'} TLS", code.name)
        return ProbeFailed(f"{who} is unreachable: {details}", code.name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeFailed(f"{who} did not answer in time", code.name)
    return ProbeFailed(f"{who} failed: {code.name}: {details}", code.name)


def run_probe(stub, address: str, *, payload_bytes: int, rounds: int, timeout: float, tls: bool,
              clock: Callable[[], float] = time.time) -> pb.ProbeReply:
    """Probe `address` through `stub` (a NodeStub with this node's channel)."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    left = lambda: max(0.05, deadline - time.monotonic())  # noqa: E731
    reply = pb.ProbeReply(tls=tls)
    who = f"node {address}"
    try:
        try:
            reply.local_address = local_address_to(host, port, min(5.0, left()))
        except OSError as e:
            raise ProbeFailed(f"{who} is unreachable: {e.strerror or e}", "UNAVAILABLE") from None
        try:
            try:
                hello = stub.Hello(pb.HelloRequest(), timeout=left())
                reply.node_id, reply.boot_id = hello.node_id, hello.boot_id
                reply.protocol_version = hello.protocol_version
                who = f"node {hello.name} ({address})" if hello.name else who
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                info = stub.Info(pb.InfoRequest(), timeout=left())  # a node without Hello
                reply.node_id, reply.boot_id = info.node_id, info.boot_id
                reply.protocol_version = info.protocol_version
                who = f"node {info.name} ({address})" if info.name else who
            t0 = clock()
            health = stub.Health(pb.HealthRequest(), timeout=left())
            t1 = clock()
            if health.unix_time:
                reply.clock_offset_s = health.unix_time - (t0 + t1) / 2
            reply.rtt_p50_ms, reply.rtt_p99_ms, reply.throughput_mbps = _round_trips(
                stub, payload_bytes, rounds, left)
            _check_link(stub, host, tls, left, reply)
        except grpc.RpcError as e:
            raise _describe(e, who, tls, host, port) from None
    except ProbeFailed as e:
        reply.reachable = False
        reply.error, reply.error_code = str(e), e.code
        return reply
    reply.reachable = True
    return reply


def _check_link(stub, host: str, tls: bool, left, reply: pb.ProbeReply) -> None:
    """Open a stage link as a stage would: the port must be reachable too,
    not only gRPC's (a firewall may allow one and not the other)."""
    from clusterd.node.link import frame_bytes

    ticket = stub.OpenLink(pb.OpenLinkRequest(from_node="probe"), timeout=left())
    reply.link_port = ticket.port
    try:
        with socket.create_connection((host, ticket.port), timeout=min(5.0, left())) as sock:
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                with ctx.wrap_socket(sock, server_hostname="clusterd") as wrapped:
                    wrapped.sendall(b"".join(frame_bytes(pb.LinkHello(ticket=ticket.ticket))))
            else:
                sock.sendall(b"".join(frame_bytes(pb.LinkHello(ticket=ticket.ticket))))
        reply.link_reachable = True
    except (OSError, ssl.SSLError) as e:
        reply.link_error = (f"the stage link port {host}:{ticket.port} cannot be reached: "
                            f"{getattr(e, 'strerror', None) or e}")


def _round_trips(stub, payload_bytes: int, rounds: int, left) -> tuple[float, float, float]:
    values = max(1, payload_bytes // 2)
    act = pb.Activation(shard=f"probe-{secrets.token_hex(6)}", width=1,
                        rows=[pb.Row(session_id="probe")])
    act.hidden.data = bytes(2 * values)
    act.hidden.dtype = "bfloat16"
    act.hidden.shape[:] = [1, 1, values]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        try:
            stub.Forward(act, timeout=left())
        except grpc.RpcError as e:
            if e.code() not in DELIVERED:
                raise
        times.append(time.perf_counter() - t)
    if not times:
        return 0.0, 0.0, 0.0
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    mbps = 2 * values * 8 * len(times) / sum(times) / 1e6
    return statistics.median(times) * 1e3, p99 * 1e3, mbps


class ProbeRpcs:
    """Needs `self.name`; the daemon gives it the node's own client channels
    with `probe_via` (without them, Probe answers FAILED_PRECONDITION)."""

    _probe_stubs = None
    _probe_tls = False
    clock: Callable[[], float] = staticmethod(time.time)  # the node's (see node/clock.py)

    def probe_via(self, stubs: Callable[[str], object], *, tls: bool,
                  clock: Callable[[], float] = time.time) -> None:
        self._probe_stubs, self._probe_tls, self.clock = stubs, tls, clock

    def Probe(self, request, context):
        if self._probe_stubs is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} cannot make outgoing calls")
        try:
            split_address(request.address)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.payload_bytes > MAX_PAYLOAD:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"payload_bytes {request.payload_bytes} is above {MAX_PAYLOAD}")
        if request.rounds > MAX_ROUNDS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"rounds {request.rounds} is above {MAX_ROUNDS}")
        if request.timeout_seconds < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must not be negative")
        timeout = min(MAX_TIMEOUT_S, request.timeout_seconds or DEFAULT_TIMEOUT_S)
        reply = run_probe(self._probe_stubs(request.address), request.address,
                          payload_bytes=request.payload_bytes, rounds=request.rounds,
                          timeout=timeout, tls=self._probe_tls, clock=self.clock)
        if not reply.reachable:
            log.info("probe of %s failed: %s", request.address, reply.error)
        return reply
