"""What each way of moving one hidden vector between two processes costs on
this machine, gRPC unary next to a persistent gRPC stream next to plain TCP.

The stages use a unary Forward per hop today; this measures what a long-lived
stream per next hop (a `stream Activation` RPC, which needs a protocol change)
would reach, so the change can be judged by numbers. Both ends are plain
Python processes with the same payload; no clusterd code on the path, except
for one variant that adds the cluster-secret interceptors the daemons use.

One-way times are stamped by the receiver with CLOCK_MONOTONIC, which two
processes on one Linux machine share.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Iterator

import grpc

_SERVICE = "clusterd.bench.Transports"
_STAMP = struct.Struct("<d")
# The bench service has no Hello: both ends bind proofs to this fixed identity.
BENCH_IDENTITY_PARTS = ("bench-node", "bench-boot")
_MAX = [("grpc.max_send_message_length", 1 << 28), ("grpc.max_receive_message_length", 1 << 28)]


class _Handlers:
    def __init__(self) -> None:
        self.one_way: list[float] = []
        self._lock = threading.Lock()

    def unary(self, request: bytes, context) -> bytes:
        return b""

    def stamped(self, request: bytes, context) -> bytes:
        now = time.monotonic()
        with self._lock:
            self.one_way.append(now - _STAMP.unpack_from(request)[0])
        return b""

    def bidi(self, requests: Iterator[bytes], context) -> Iterator[bytes]:
        for _ in requests:
            yield b""

    def sink(self, requests: Iterator[bytes], context) -> bytes:
        for msg in requests:
            now = time.monotonic()
            with self._lock:
                self.one_way.append(now - _STAMP.unpack_from(msg)[0])
        return b""

    def collect(self, request: bytes, context) -> bytes:
        with self._lock:
            data, self.one_way = self.one_way, []
        return struct.pack(f"<{len(data)}d", *data)


def _tcp_sink(h: _Handlers, srv) -> None:
    """Length-prefixed stamped messages on plain TCP, stamped again on receipt."""
    import socket

    from clusterd.bench.tcp_ack import HEADER, recv_exactly

    buf = bytearray(1 << 20)
    head = memoryview(bytearray(HEADER.size))
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while recv_exactly(conn, head):
                (n,) = HEADER.unpack(head)
                if n > len(buf):
                    buf = bytearray(n)
                if not recv_exactly(conn, memoryview(buf)[:n]):
                    break
                now = time.monotonic()
                with h._lock:
                    h.one_way.append(now - _STAMP.unpack_from(buf)[0])


def _bench_identity():
    from clusterd.proofs import NodeIdentity
    return NodeIdentity(*BENCH_IDENTITY_PARTS)


def _server(h: _Handlers, interceptors=()) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_MAX,
                         interceptors=list(interceptors))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(h.unary),
        "Stamped": grpc.unary_unary_rpc_method_handler(h.stamped),
        "Bidi": grpc.stream_stream_rpc_method_handler(h.bidi),
        "Sink": grpc.stream_unary_rpc_method_handler(h.sink),
        "Collect": grpc.unary_unary_rpc_method_handler(h.collect),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def serve() -> None:
    import os
    import socket

    from clusterd.proofs import AuthServerInterceptor

    h = _Handlers()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    threading.Thread(target=_tcp_sink, args=(h, tcp), daemon=True).start()
    server, port = _server(h)
    # The same service behind the cluster-secret check the daemons use.
    _authed, auth_port = _server(h, [AuthServerInterceptor(os.environ["CLUSTERD_BENCH_SECRET"],
                                                           _bench_identity())])
    print(port, tcp.getsockname()[1], auth_port, flush=True)
    server.wait_for_termination()


class _Feed:
    """A request iterator fed one message at a time (a stream kept open)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: list = []

    def put(self, item) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify()

    def __iter__(self):
        return self

    def __next__(self):
        with self._cv:
            while not self._items:
                self._cv.wait()
            item = self._items.pop(0)
        if item is None:
            raise StopIteration
        return item


class TransportPeer:
    def __init__(self) -> None:
        import os
        import secrets

        from clusterd.proofs import AuthClientInterceptor

        secret = secrets.token_hex(24)
        self.proc = subprocess.Popen([sys.executable, "-m", "clusterd.bench.transports"],
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "CLUSTERD_BENCH_SECRET": secret})
        port, self._tcp_port, auth_port = map(int, self.proc.stdout.readline().split())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=_MAX)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self._plain = self.channel
        self._authed = grpc.intercept_channel(
            grpc.insecure_channel(f"127.0.0.1:{auth_port}", options=_MAX),
            AuthClientInterceptor(secret, lambda timeout: _bench_identity()))

    def _m(self, kind: str, name: str):
        return getattr(self.channel, kind)(f"/{_SERVICE}/{name}")

    def unary(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        call = self._m("unary_unary", "Unary")
        out = []
        for _ in range(count):
            t = time.perf_counter()
            call(payload, timeout=30)
            out.append(time.perf_counter() - t)
            time.sleep(pace_s)
        return out

    def unary_one_way(self, payload: bytes, count: int, pace_s: float,
                      mode: str = "blocking") -> list[float]:
        """Unary calls stamped when the caller starts them and again in the
        server's handler. mode: "blocking" (the caller waits out the reply),
        "future" (grpc's future(), which starts a polling thread whenever no
        other call is in flight), "thread" (handed to one long-lived sender
        thread that makes blocking calls)."""
        call = self._m("unary_unary", "Stamped")
        body = payload[_STAMP.size:]
        feed = _Feed()
        sender = None
        if mode == "thread":
            def run():
                for msg in feed:
                    call(_STAMP.pack(msg) + body, timeout=30)
            sender = threading.Thread(target=run, daemon=True)
            sender.start()
        pending = []  # a future that is dropped gets cancelled
        for _ in range(count):
            t = time.monotonic()
            if mode == "blocking":
                call(_STAMP.pack(t) + body, timeout=30)
            elif mode == "future":
                pending.append(call.future(_STAMP.pack(t) + body, timeout=30))
            else:
                feed.put(t)
            time.sleep(pace_s)
        for f in pending:
            f.result()
        if sender is not None:
            feed.put(None)
            sender.join()
        time.sleep(0.2)
        raw = self._m("unary_unary", "Collect")(b"", timeout=30)
        return list(struct.unpack(f"<{len(raw) // 8}d", raw))

    def tcp_one_way(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        import socket

        from clusterd.bench.tcp_ack import HEADER

        sock = socket.create_connection(("127.0.0.1", self._tcp_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = payload[_STAMP.size:]
        head = HEADER.pack(len(payload))
        try:
            for _ in range(count):
                sock.sendall(head + _STAMP.pack(time.monotonic()) + body)
                time.sleep(pace_s)
        finally:
            sock.close()
        time.sleep(0.2)
        raw = self._m("unary_unary", "Collect")(b"", timeout=30)
        return list(struct.unpack(f"<{len(raw) // 8}d", raw))

    def bidi(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        feed = _Feed()
        replies = self._m("stream_stream", "Bidi")(feed, timeout=600)
        out = []
        try:
            for _ in range(count):
                t = time.perf_counter()
                feed.put(payload)
                next(replies)
                out.append(time.perf_counter() - t)
                time.sleep(pace_s)
        finally:
            feed.put(None)
            replies.cancel()
        return out

    def stream_one_way(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        """Messages on one open client stream, each stamped when sent and
        again when the server's handler has it: the one-way hop of a stream."""
        feed = _Feed()
        done = self._m("stream_unary", "Sink").future(feed, timeout=600)
        body = payload[_STAMP.size:]
        for _ in range(count):
            feed.put(_STAMP.pack(time.monotonic()) + body)
            time.sleep(pace_s)
        feed.put(None)
        done.result()
        raw = self._m("unary_unary", "Collect")(b"", timeout=30)
        return list(struct.unpack(f"<{len(raw) // 8}d", raw))

    def unary_one_way_authed(self, payload: bytes, count: int, pace_s: float) -> list[float]:
        """Blocking unary calls through the cluster-secret interceptors (client and server)."""
        self.channel = self._authed
        try:
            return self.unary_one_way(payload, count, pace_s, "blocking")
        finally:
            self.channel = self._plain

    def close(self) -> None:
        self._plain.close()
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


if __name__ == "__main__":
    serve()
