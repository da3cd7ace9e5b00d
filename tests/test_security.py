"""The cluster secret and the proof every RPC must carry, over real gRPC on
loopback, against the real generated servicer base class."""

import multiprocessing
import os
import stat
import subprocess
import time
from concurrent import futures

import grpc
import pytest

from clusterd import security
from clusterd.proofs import (PROOF_HEADER, AuthClientInterceptor, AuthServerInterceptor,
                             NodeIdentity, make_proof)
from clusterd.security import (
    ClientSecurity,
    SecretError,
    TlsFiles,
    explain_rpc_error,
    load_secret,
    store_secret,
)
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc

SECRET = "s3cret-" + "A" * 30
OTHER = "other-" + "B" * 30
METHODS = list(pb.DESCRIPTOR.services_by_name["Node"].methods)
GUARDED = [m for m in METHODS if m.name != "Hello"]  # Hello is the one public call
IDENT = NodeIdentity("n1", "b" * 32)


def signer(secret, address=None):
    """A client interceptor bound to the test server's identity, or (with
    `address`) to what that node's Hello says."""
    if address is None:
        return AuthClientInterceptor(secret, lambda timeout: IDENT)

    def learn(timeout):
        from clusterd.wire.channel import hello

        channel = grpc.insecure_channel(address)
        try:
            reply = hello(channel, timeout)
        finally:
            channel.close()
        return NodeIdentity(reply.node_id, reply.boot_id)

    return AuthClientInterceptor(secret, learn)


class RecordingNode(rpc.NodeServicer):
    """Answers Info and Health; remembers every call that reached it."""

    def __init__(self):
        self.calls = []

    def Hello(self, request, context):
        return pb.HelloReply(node_id=IDENT.node_id, boot_id=IDENT.boot_id, name="test-node")

    def Info(self, request, context):
        self.calls.append("Info")
        return pb.NodeInfo(node_id="n1", name="test-node")

    def Health(self, request, context):
        self.calls.append("Health")
        return pb.HealthReply(node_id="n1", state="idle")

    def Events(self, request, context):
        self.calls.append("Events")
        yield pb.TokenEvent(tokens=[1], done=True)


@pytest.fixture
def node():
    servicer = RecordingNode()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[AuthServerInterceptor(SECRET, IDENT, node_label="'test-node'")],
    )
    rpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def _call(address, method, interceptors=(), metadata=None):
    """Call `method` with an empty request; returns the status code and details."""
    channel = grpc.insecure_channel(address)
    if interceptors:
        channel = grpc.intercept_channel(channel, *interceptors)
    request = getattr(pb, method.input_type.name)()
    path = f"/clusterd.v1.Node/{method.name}"
    reply = getattr(pb, method.output_type.name).FromString
    ser = type(request).SerializeToString
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=ser, response_deserializer=reply)
            list(call(request, timeout=5, metadata=metadata))
        else:
            call = channel.unary_unary(path, request_serializer=ser, response_deserializer=reply)
            call(request, timeout=5, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()
    finally:
        channel.close()


@pytest.mark.parametrize("method", GUARDED, ids=[m.name for m in GUARDED])
def test_every_rpc_refused_without_or_with_wrong_secret(node, method):
    address, servicer = node
    code, details = _call(address, method)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "secret missing" in details and "test-node" in details
    code, details = _call(address, method, [signer(OTHER)])
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "secret wrong" in details
    for text in (SECRET, OTHER):
        assert text not in details
    assert servicer.calls == []  # a refused call never reaches the servicer
    # With the secret the call gets through (unimplemented ones say so).
    code, _ = _call(address, method, [signer(SECRET)])
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)
    assert code != grpc.StatusCode.UNAUTHENTICATED


def test_hello_needs_no_proof_and_says_only_public_facts(node):
    address, _ = node
    hello = next(m for m in METHODS if m.name == "Hello")
    assert _call(address, hello)[0] == grpc.StatusCode.OK
    fields = {f.name for f in pb.HelloReply.DESCRIPTOR.fields}
    assert fields == {"node_id", "boot_id", "protocol_version", "name"}


def test_bearer_secret_or_garbage_is_refused_as_wrong(node):
    address, _ = node
    info = next(m for m in METHODS if m.name == "Info")
    for value in (SECRET, "v1.1.2.3", "", "v2." * 10, "v2.n1." + "b" * 32 + ".1.2.3",
                  "x" * 4000):
        code, details = _call(address, info, metadata=[(PROOF_HEADER, value)])
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "secret wrong" in details and SECRET not in details


def test_a_captured_proof_cannot_be_replayed(node):
    address, servicer = node
    info = next(m for m in METHODS if m.name == "Info")
    proof = make_proof(SECRET, "/clusterd.v1.Node/Info", IDENT)
    assert _call(address, info, metadata=[(PROOF_HEADER, proof)])[0] == grpc.StatusCode.OK
    code, details = _call(address, info, metadata=[(PROOF_HEADER, proof)])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in details
    assert servicer.calls == ["Info"]


def test_a_proof_is_bound_to_its_method(node):
    address, servicer = node
    health = next(m for m in METHODS if m.name == "Health")
    proof = make_proof(SECRET, "/clusterd.v1.Node/Info", IDENT)
    code, details = _call(address, health, metadata=[(PROOF_HEADER, proof)])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong" in details
    assert servicer.calls == []


def test_old_proof_expires_and_says_clock(node):
    address, _ = node
    info = next(m for m in METHODS if m.name == "Info")
    proof = make_proof(SECRET, "/clusterd.v1.Node/Info", IDENT, now=time.time() - 3600)
    code, details = _call(address, info, metadata=[(PROOF_HEADER, proof)])
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in details and "clocks" in details


def test_nonce_log_forgets_after_window():
    now = [1000.0]
    interceptor = AuthServerInterceptor(SECRET, IDENT, window_s=10, clock=lambda: now[0])
    proof = make_proof(SECRET, "/m", IDENT, now=now[0], nonce="fixed")
    assert interceptor.check("/m", [(PROOF_HEADER, proof)]) is None
    assert "replayed" in interceptor.check("/m", [(PROOF_HEADER, proof)]).message
    now[0] += 25  # past the window: the proof is stale, and its nonce forgotten
    assert "expired" in interceptor.check("/m", [(PROOF_HEADER, proof)]).message
    fresh = make_proof(SECRET, "/m", IDENT, now=now[0], nonce="new")
    assert interceptor.check("/m", [(PROOF_HEADER, fresh)]) is None
    assert interceptor.checker._nonces._seen == {"new"}  # memory stays bounded


def test_a_proof_is_bound_to_one_node_and_one_boot():
    checker = AuthServerInterceptor(SECRET, IDENT)
    for other in (NodeIdentity("n2", IDENT.boot_id), NodeIdentity(IDENT.node_id, "c" * 32)):
        refusal = checker.check("/m", [(PROOF_HEADER, make_proof(SECRET, "/m", other))])
        assert "another node or an earlier start" in refusal.message
        assert "Hello" in refusal.message and SECRET not in refusal.message


def test_client_error_names_the_node(node):
    address, _ = node
    channel = grpc.intercept_channel(grpc.insecure_channel(address), signer(OTHER))
    with pytest.raises(grpc.RpcError) as e:
        rpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5)
    text = explain_rpc_error(e.value, f"studio-2 ({address})")
    assert text.startswith(f"node studio-2 ({address}) refused")
    assert "differs" in text and OTHER not in text and SECRET not in text
    channel.close()


# -- the secret on disk ------------------------------------------------------


def test_secret_created_once_with_mode_600(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTERD_SECRET", raising=False)
    assert load_secret(tmp_path, create=False) is None
    first = load_secret(tmp_path, create=True)
    assert len(first) >= 40
    mode = stat.S_IMODE(os.stat(tmp_path / "secret").st_mode)
    assert mode == 0o600
    assert load_secret(tmp_path, create=True) == first
    assert load_secret(tmp_path, create=False) == first


def test_env_wins_over_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTERD_SECRET", raising=False)
    load_secret(tmp_path, create=True)
    monkeypatch.setenv("CLUSTERD_SECRET", OTHER)
    assert load_secret(tmp_path, create=True) == OTHER


def test_unsafe_or_short_secrets_refused_without_echo(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTERD_SECRET", raising=False)
    store_secret(tmp_path, SECRET)
    os.chmod(tmp_path / "secret", 0o644)
    with pytest.raises(SecretError, match="chmod 600") as e:
        load_secret(tmp_path, create=False)
    assert SECRET not in str(e.value)
    monkeypatch.setenv("CLUSTERD_SECRET", "short")
    with pytest.raises(SecretError, match="too short") as e:
        load_secret(tmp_path, create=False)
    assert "short" not in str(e.value).replace("too short", "")


def _race(home, queue):
    os.environ.pop("CLUSTERD_SECRET", None)
    queue.put(load_secret(home, create=True))


def test_concurrent_first_runs_agree_on_one_secret(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    got = {queue.get(timeout=20) for _ in procs}
    for p in procs:
        p.join(10)
    assert len(got) == 1


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
             "-subj", "/CN=clusterd", "-addext", "subjectAltName=DNS:clusterd"],
            check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return TlsFiles(cert=d / "cert.pem", key=d / "key.pem", ca=d / "cert.pem")


def test_tls_channel_with_secret(cluster_cert):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[AuthServerInterceptor(SECRET, IDENT)])
    rpc.add_NodeServicer_to_server(RecordingNode(), server)
    port = server.add_secure_port("127.0.0.1:0", security.server_credentials(cluster_cert))
    server.start()
    try:
        client = ClientSecurity(SECRET, cluster_cert)
        channel = grpc.intercept_channel(
            grpc.secure_channel(f"127.0.0.1:{port}", security.channel_credentials(cluster_cert),
                                options=security.tls_channel_options()),
            *client.interceptors(lambda timeout: IDENT))
        assert rpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5).name == "test-node"
        channel.close()
        # A plaintext client cannot talk to a TLS node at all.
        plain = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"),
                                       *client.interceptors(lambda timeout: IDENT))
        with pytest.raises(grpc.RpcError) as e:
            rpc.NodeStub(plain).Info(pb.InfoRequest(), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        server.stop(0)


def test_tls_needs_cert_and_key():
    with pytest.raises(SecretError, match="--tls-key"):
        security.server_credentials(TlsFiles(cert="x.pem"))


# -- a real daemon process -------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from clusterd.local_cluster import start_node

    node = start_node(tmp_path_factory.mktemp("sec"), "guarded", extra=["--log-level", "debug"],
                      env={"CLUSTERD_SECRET": SECRET})
    yield node
    node.stop()


@pytest.mark.e2e
def test_real_daemon_refuses_every_rpc_and_never_logs_the_secret(daemon):
    for method in GUARDED:
        for interceptors, word in (((), "missing"), ((signer(OTHER, daemon.address),), "wrong")):
            code, details = _call(daemon.address, method, interceptors)
            assert code == grpc.StatusCode.UNAUTHENTICATED, method.name
            assert f"secret {word}" in details and "guarded" in details
            assert SECRET not in details and OTHER not in details
    # With the secret, the daemon answers (and is still up after all that).
    code, _ = _call(daemon.address, next(m for m in METHODS if m.name == "Health"),
                    [signer(SECRET, daemon.address)])
    assert code == grpc.StatusCode.OK
    log = daemon.log()
    assert "refused /clusterd.v1.Node/" in log
    assert SECRET not in log and OTHER not in log


@pytest.mark.e2e
def test_peer_handle_error_names_the_node(daemon, monkeypatch):
    from clusterd.coordinator.peers import PeerError, PeerHandle

    monkeypatch.setenv("CLUSTERD_SECRET", OTHER)
    peer = PeerHandle(daemon.address)
    with pytest.raises(PeerError) as e:
        peer.info()
    peer.close()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert str(e.value).startswith(f"node {daemon.address} refused the request")
    assert "clusterd secret --set" in str(e.value) and OTHER not in str(e.value)


@pytest.mark.e2e
def test_daemon_serves_tls_and_clients_use_it(cluster_cert, tmp_path, monkeypatch):
    from clusterd.cli.cluster_options import probe_node
    from clusterd.coordinator.peers import PeerError
    from clusterd.local_cluster import start_node

    node = start_node(tmp_path, "tls-node", env={"CLUSTERD_SECRET": SECRET},
                      extra=["--tls-cert", str(cluster_cert.cert), "--tls-key", str(cluster_cert.key)])
    try:
        monkeypatch.setenv("CLUSTERD_SECRET", SECRET)
        monkeypatch.setenv("CLUSTERD_TLS_CA", str(cluster_cert.ca))
        assert probe_node(node.address).name == "tls-node"
        monkeypatch.delenv("CLUSTERD_TLS_CA")  # a plaintext client gets nowhere
        with pytest.raises(PeerError) as e:
            probe_node(node.address, timeout=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        node.stop()


@pytest.mark.e2e
def test_pipeline_runs_over_tls_node_to_node(cluster_cert, tmp_path, synthetic):
    """Stages call each other over TLS too: `--tls-cert/--tls-key` alone make a
    self-signed cluster certificate serve as its own CA."""
    import json
    import sys

    from clusterd.local_cluster import start_node

    tls = ["--tls-cert", str(cluster_cert.cert), "--tls-key", str(cluster_cert.key)]
    nodes = [start_node(tmp_path, f"tls{i}", env={"CLUSTERD_SECRET": SECRET}, extra=tls)
             for i in range(2)]
    try:
        model = synthetic("deepseek_v3", "tiny")
        env = {**os.environ, "CLUSTERD_SECRET": SECRET, "CLUSTERD_TLS_CA": str(cluster_cert.ca)}
        out = subprocess.run(
            [sys.executable, "-m", "clusterd", "run", str(model), "--peer", nodes[0].address,
             "--peer", nodes[1].address, "--prompt", "hi", "--max-tokens", "4", "--temp", "0",
             "--json"], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["tokens"]) >= 1
    finally:
        for n in nodes:
            n.stop()


def test_refusals_are_logged_once_a_minute_per_address_and_capped_in_all():
    from clusterd.proofs import REFUSAL_LOG_PER_MINUTE, RefusalLog, source_ip

    assert source_ip("ipv4:10.0.0.2:5123") == source_ip("ipv4:10.0.0.2:6000") == "10.0.0.2"
    assert source_ip("ipv6:[::1]:5123") == "::1"
    now = [0.0]
    log = RefusalLog(clock=lambda: now[0])
    assert log.should_log("10.0.0.2") and not log.should_log("10.0.0.2")
    many = [log.should_log(f"10.1.{i // 256}.{i % 256}") for i in range(500)]
    assert sum(many) == REFUSAL_LOG_PER_MINUTE - 1  # a flood from many addresses: a few lines
    now[0] += 61
    assert log.should_log("10.0.0.2")  # a minute later it is logged again
