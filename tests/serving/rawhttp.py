"""HTTP/1.1 by hand over a socket, for what no client library will send:
bad framing, half-sent requests, several requests on one connection."""

import json
import socket
from dataclasses import dataclass
from typing import Optional

from serving.serverproc import KEY


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def message(self) -> str:
        err = self.json()["error"]
        return err if isinstance(err, str) else err["message"]


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def head(method: str, path: str, body: bytes = b"", key: Optional[str] = KEY,
         extra: str = "", length: Optional[str] = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if body or length is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_reply(sock: socket.socket) -> Reply:
    """One response (Content-Length framed, or until the server closes)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a reply (got {buf!r})")
        buf += chunk
    top, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:n]
    else:
        while chunk := sock.recv(65536):
            rest += chunk
        body = rest
    return Reply(int(status_line.split()[1]), headers, body)


def send(port: int, data: bytes, timeout: float = 30.0) -> Reply:
    with connect(port, timeout) as sock:
        sock.sendall(data)
        return read_reply(sock)


def post(port: int, path: str, body, key: Optional[str] = KEY) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(port, head("POST", path, raw, key) + raw)


def get(port: int, path: str, key: Optional[str] = KEY) -> Reply:
    return send(port, head("GET", path, key=key))
