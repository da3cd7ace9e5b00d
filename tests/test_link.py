"""A link whose next stage went away and came back: the first frame after
that reaches the new stage (a frame written to the old, closed connection
would be accepted by the kernel and lost without a word), and a link that
is up is kept (over TLS too, whose server speaks after the handshake)."""

import queue
import subprocess

import pytest

from clusterd.node.link import LinkClient, LinkServer
from clusterd.security import TlsFiles
from clusterd.wire import clusterd_pb2 as pb


@pytest.fixture(scope="module", params=["tcp", "tls"])
def tls(request, tmp_path_factory) -> TlsFiles:
    if request.param == "tcp":
        return TlsFiles()
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=clusterd", "-addext", "subjectAltName=DNS:clusterd"],
                   check=True, capture_output=True, timeout=60)
    return TlsFiles(cert=d / "cert.pem", key=d / "key.pem", ca=d / "cert.pem")


def frame(position: int) -> pb.Activation:
    return pb.Activation(shard="s", width=1, rows=[pb.Row(session_id="x", position=position)])


def test_the_first_frame_after_the_next_stage_restarted_is_not_lost(tls):
    got: "queue.Queue" = queue.Queue()

    def server(label: str) -> LinkServer:
        return LinkServer("127.0.0.1", lambda act, raw, peer: got.put(
            (label, act.rows[0].position)), max_raw_bytes=1 << 20, tls=tls)

    servers = [server("old")]
    opened = []

    def open_link() -> pb.OpenLinkReply:
        s = servers[-1]
        opened.append(s)
        return pb.OpenLinkReply(port=s.port, ticket=s.ticket("127.0.0.1"))

    client = LinkClient("127.0.0.1:1", open_link, tls)
    try:
        for i in range(3):
            client.send(frame(i))
        assert [got.get(timeout=10) for _ in range(3)] == [("old", 0), ("old", 1), ("old", 2)]
        assert len(opened) == 1  # one link for all three
        servers[0].close()  # the next stage's process is gone: its end of the link closes
        servers.append(server("new"))
        for i in range(3, 5):
            client.send(frame(i))
        assert [got.get(timeout=10) for _ in range(2)] == [("new", 3), ("new", 4)]
        assert len(opened) == 2
    finally:
        client.close()
        for s in servers:
            s.close()
