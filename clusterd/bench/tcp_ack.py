"""A plain TCP peer for the hop baseline: reads length-prefixed messages and
answers each with one byte, the same exchange a unary Forward is (a request
of N bytes, an empty reply). Run as `python -m clusterd.bench.tcp_ack`; it
prints its port and serves one connection at a time until killed."""

import socket
import struct
import sys

HEADER = struct.Struct("<I")


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def serve(host: str = "127.0.0.1") -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    head = memoryview(bytearray(HEADER.size))
    buf = bytearray(1 << 20)
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
                conn.sendall(b"\x01")


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1")
