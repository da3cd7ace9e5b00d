"""uvicorn, with what a server facing the network needs and uvicorn's h11
protocol lacks: a deadline for the request head (a client that connects and
sends half a request is answered 408 and dropped after a bounded time) and
malformed HTTP answered with a JSON error that says what was wrong."""

from __future__ import annotations

import json
import socket
import threading
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from clusterd.serve.body import Limits


class _Connection(h11.Connection):
    """h11's connection, remembering why it rejected a request, and
    rejecting a request head over the limit even when it arrived whole (h11
    bounds only heads still incomplete)."""

    protocol_error: Optional[h11.RemoteProtocolError] = None

    def next_event(self):
        try:
            event = super().next_event()
            limit = self._max_incomplete_event_size
            if isinstance(event, h11.Request) and _head_size(event) > limit:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            self.protocol_error = e
            raise


def _head_size(r: h11.Request) -> int:
    """The request line and headers, as sent (give or take spaces)."""
    return len(r.method) + len(r.target) + 12 + sum(len(k) + len(v) + 4 for k, v in r.headers)


def _raw_reply(status: int, reason: bytes, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


def protocol_for(limits: Limits) -> type[H11Protocol]:
    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conn = _Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
            self._head_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(limits.read_timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_late(self) -> None:
            self._head_deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_raw_reply(
                    408, b"Request Timeout",
                    f"no complete request head arrived within {limits.read_timeout_s:g} s",
                    "read_timeout"))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            e = self.conn.protocol_error
            status = getattr(e, "error_status_hint", 400)
            if status == 431:
                text = (f"the request line and headers are larger than "
                        f"{limits.max_header_bytes} bytes")
                reason = b"Request Header Fields Too Large"
            else:
                status, reason = 400, b"Bad Request"
                text = f"malformed HTTP request: {e}" if e else msg
            self.transport.write(_raw_reply(status, reason, text, "bad_http"))
            self.transport.close()

    return Protocol


class Server:
    """uvicorn on a socket bound at construction (so port 0 is known)."""

    def __init__(self, app, host: str, port: int, limits: Limits, access_log: bool = True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets that say so, and with Nagle on a keep-alive client waits
        # ~40 ms for each response's body (delayed ACK).
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(limits.max_connections)  # connections wait from now on
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, http=protocol_for(limits), lifespan="off", log_config=None,
            access_log=access_log, timeout_keep_alive=int(max(1, limits.keep_alive_s)),
            limit_concurrency=limits.max_connections, timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=limits.max_header_bytes)
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    def serve_forever(self) -> None:
        """Until SIGINT or SIGTERM (in the main thread) or stop()."""
        self._server.run(sockets=[self.sock])

    def start(self) -> None:
        """Serve on a thread of its own (benchmarks, embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="clusterd-http",
                                        daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            self._thread.join(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
