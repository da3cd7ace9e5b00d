"""Persistent links between stages: activations travel on one long-lived TCP
connection per next stage instead of one gRPC call each (a gRPC call costs
~1 ms of Python; a frame on an open socket costs about a TCP round trip).

Opening a link is authorised over gRPC: the calling stage asks the next one
for a ticket (OpenLink, which carries a proof of the cluster secret like
every call), connects to the port it names, and presents the ticket, which is
single-use, valid for a few seconds and only from the address that asked.
With TLS configured, the link is TLS with the cluster's certificate.

A frame is a 4-byte big-endian length, that many bytes of a serialised
Activation whose tensor data is left out, then Tensor.raw_bytes of raw data,
so a hidden state is never copied into a protobuf message."""

from __future__ import annotations

import logging
import queue
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from google.protobuf.message import DecodeError

from clusterd.security import TLS_SERVER_NAME, TlsFiles
from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.node")

TICKET_TTL_S = 10.0
MAX_TICKETS = 256
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HEADER_BYTES = 4 << 20  # an Activation's rows and ids, not its tensor
_LEN = struct.Struct(">I")

# on_frame(activation, raw tensor bytes or None, peer name)
OnFrame = Callable[[pb.Activation, Optional[bytes], str], None]


class LinkError(ConnectionError):
    """The link to the next stage is down; the message names it."""


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Frames go one way on a link, so anything to read on the sending side
    is its end: the next stage restarted or went away. A frame written to such
    a socket is accepted by the kernel and lost; check before each send.
    (TLS's own post-handshake messages are read and dropped here.)"""
    try:
        poller = select.poll()  # not select(): no limit on the descriptor's number
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        sock.setblocking(False)
        try:
            sock.recv(1)  # b"": closed; data: never sent on a link, so not one
            return True
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        finally:
            sock.settimeout(None)
    except (OSError, ValueError):
        return True


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise EOFError("link closed")
    return data


def read_frame(f, max_raw: int) -> tuple[pb.Activation, Optional[bytes]]:
    (size,) = _LEN.unpack(_read_exact(f, 4))
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {size} bytes is larger than {MAX_HEADER_BYTES}")
    act = pb.Activation()
    try:
        act.ParseFromString(_read_exact(f, size))
    except DecodeError:
        raise ValueError("frame is not an Activation") from None
    raw_len = act.hidden.raw_bytes if act.HasField("hidden") else 0
    if raw_len > max_raw:
        raise ValueError(f"frame carries {raw_len} bytes of tensor data, more than {max_raw}")
    return act, (_read_exact(f, raw_len) if raw_len else None)


def frame_bytes(msg, raw: Optional[memoryview] = None) -> list:
    header = msg.SerializeToString()
    parts = [_LEN.pack(len(header)) + header]
    if raw is not None and len(raw):
        parts.append(raw)
    return parts


@dataclass(frozen=True)
class _Ticket:
    host: str
    expires: float


class LinkServer:
    """Accepts links from previous stages and hands their frames on."""

    def __init__(self, host: str, on_frame: OnFrame, *, max_raw_bytes: int,
                 tls: TlsFiles = TlsFiles(), node_name: str = "this node", port: int = 0):
        self._on_frame = on_frame
        self._max_raw = max_raw_bytes
        self._name = node_name
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._ssl: Optional[ssl.SSLContext] = None
        if tls.server_enabled:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(str(tls.cert), str(tls.key))
        family = socket.AF_INET6 if ":" in host and host not in ("0.0.0.0",) else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise LinkError(f"cannot listen for stage links on {host}:{port}: {e.strerror}") \
                from None
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def ticket(self, host: str) -> bytes:
        """A single-use ticket for a link from `host` (the caller's IP)."""
        now = time.monotonic()
        t = secrets.token_bytes(32)
        with self._lock:
            for k in [k for k, v in self._tickets.items() if v.expires < now]:
                del self._tickets[k]
            if len(self._tickets) >= MAX_TICKETS:
                raise LinkError(f"{self._name} has too many links being opened at once")
            self._tickets[t] = _Ticket(host, now + TICKET_TTL_S)
        return t

    def _redeem(self, ticket: bytes, host: str) -> bool:
        with self._lock:
            t = self._tickets.pop(ticket, None)
        return t is not None and t.expires >= time.monotonic() and t.host == host

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
            threading.Thread(target=self._serve, args=(conn, host), name="link-in",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, host: str) -> None:
        peer = f"{host}"
        try:
            _nodelay(conn)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)
            f = conn.makefile("rb", buffering=1 << 16)
            (size,) = _LEN.unpack(_read_exact(f, 4))
            hello = pb.LinkHello()
            if size > 1024:
                raise ValueError("link hello too large")
            hello.ParseFromString(_read_exact(f, size))
            if not self._redeem(hello.ticket, host):
                log.warning("refused a link from %s: no valid ticket", host)
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            while True:
                act, raw = read_frame(f, self._max_raw)
                self._on_frame(act, raw, peer)
        except (EOFError, ConnectionError, socket.timeout, ssl.SSLError, OSError):
            pass
        except (ValueError, DecodeError) as e:
            log.warning("closed the link from %s: %s", host, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


class LinkClient:
    """The link to one next stage: connects on first use (asking `open_link`
    for a ticket), sends frames in order, inline or from its sender thread."""

    def __init__(self, address: str, open_link: Callable[[], pb.OpenLinkReply],
                 tls: TlsFiles = TlsFiles()):
        self.address = address
        self._open_link = open_link
        self._tls = tls
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()  # one writer at a time, frames whole
        self._queue: "queue.Queue" = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def _connect(self) -> socket.socket:
        reply = self._open_link()
        host = self.address.rsplit(":", 1)[0].strip("[]")
        sock = socket.create_connection((host, reply.port), timeout=HANDSHAKE_TIMEOUT_S)
        _nodelay(sock)
        if self._tls.client_enabled:
            ctx = ssl.create_default_context(cafile=str(self._tls.ca))
            sock = ctx.wrap_socket(sock, server_hostname=TLS_SERVER_NAME)
        sock.sendall(b"".join(frame_bytes(pb.LinkHello(ticket=reply.ticket))))
        sock.settimeout(None)
        return sock

    def send(self, act: pb.Activation, raw: Optional[memoryview] = None) -> None:
        """Blocking send of one frame; reconnects once if the link broke."""
        parts = frame_bytes(act, raw)
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._sock is not None and _closed_by_peer(self._sock):
                        self._drop()
                    if self._sock is None:
                        self._sock = self._connect()
                    if len(parts) == 1 or len(parts[1]) < (1 << 16):
                        self._sock.sendall(b"".join(parts))
                    else:
                        for p in parts:
                            self._sock.sendall(p)
                    return
                except (OSError, ssl.SSLError) as e:
                    self._drop()
                    if attempt:
                        raise LinkError(f"the link to {self.address} is down: {e}") from None
                except Exception as e:  # OpenLink refused (a gRPC error) or similar
                    self._drop()
                    raise LinkError(f"cannot open a link to {self.address}: {e}") from None

    @property
    def idle(self) -> bool:
        return self._pending == 0

    def send_later(self, act: pb.Activation, raw, on_error: Callable[[LinkError], None]) -> None:
        """Queue a frame for the sender thread (the compute thread goes on);
        frames keep their order with inline sends made while this is idle."""
        with self._pending_lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"link-out {self.address}")
                self._thread.start()
        self._queue.put((act, raw, on_error))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            act, raw, on_error = item
            try:
                self.send(act, raw)
            except LinkError as e:
                on_error(e)
            finally:
                with self._pending_lock:
                    self._pending -= 1

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        self._queue.put(None)
        with self._lock:
            self._drop()
