"""A node stops cleanly whatever it is doing (real daemons): SIGTERM exits
with status 0 within seconds, never with SIGABRT; a used port is an error."""

import os
import signal
import subprocess
import sys
import threading
import time

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.local_cluster import LocalCluster
from clusterd.wire import clusterd_pb2 as pb
from daemons import start_daemon


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def sigterm(node, timeout: float = 60.0) -> tuple[int, float]:
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(timeout)
    return code, time.monotonic() - t0


def test_sigterm_while_a_load_waits_on_busy_compute(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    node = start_daemon(tmp_path, "busy")
    peer = PeerHandle(node.address)
    try:
        shard = peer.load_shard(pb.StageSpec(model_path=str(model), start_layer=0,
                                             end_layer=2)).shard.shard
        peer.open_session(pb.OpenSessionRequest(session_id="long", next_address="127.0.0.1:1",
                                                shard=shard, client_id="c"))
        # A 2048-token prefill keeps this machine's compute thread busy for
        # many seconds; the load behind it waits.
        peer.forward(pb.Activation(shard=shard, rows=[pb.Row(session_id="long")], width=2048,
                                   tokens=pb.TokenIds(ids=[1] * 2048)))
        loader = threading.Thread(target=lambda: _ignore(lambda: peer.load_shard(
            pb.StageSpec(model_path=str(model), start_layer=0, end_layer=3))), daemon=True)
        loader.start()
        assert wait_for(lambda: peer.health().state == "loading", 10)
        code, took = sigterm(node)
        assert code == 0, node.log()[-2000:]
        assert took < 15, took  # it used to run on until SIGKILL
        loader.join(10)
        assert not loader.is_alive()  # its call ended with the node
        assert "stopping" in node.log()
    finally:
        peer.close()
        node.stop()


def _ignore(fn):
    try:
        fn()
    except PeerError:
        pass


def test_no_abort_when_stopped_during_or_right_after_a_run(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    base = [sys.executable, "-m", "clusterd", "run", str(model), "--temp", "0", "--raw",
            "--json"]
    for round_ in range(2):
        with LocalCluster(3, workdir=tmp_path / f"r{round_}", prefix=f"r{round_}n") as cluster:
            peers = sum((["--peer", a] for a in cluster.addresses), [])
            if round_ == 0:  # stopped mid-generation
                run = subprocess.Popen([*base, *peers, "--prompt", "a", "--context", "8192",
                                        "--max-tokens", "8000"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=os.environ.copy())
                first = PeerHandle(cluster.addresses[0])
                try:
                    assert wait_for(lambda: any(s.tokens > 10 for s in first.info().sessions),
                                    120, 0.2)
                finally:
                    first.close()
            else:  # stopped right after a run that finished
                out = subprocess.run([*base, *peers, "--prompt", "hi", "--max-tokens", "8"],
                                     capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, out.stderr
                run = None
            for n in reversed(cluster.nodes):
                n.proc.send_signal(signal.SIGTERM)
            codes = [n.proc.wait(30) for n in cluster.nodes]
            assert codes == [0, 0, 0], [n.log()[-800:] for n in cluster.nodes]
            for n in cluster.nodes:
                assert "terminate called" not in n.log()
            if run is not None:
                run.kill()
                run.wait()


def test_a_port_in_use_is_an_error(tmp_path):
    first = start_daemon(tmp_path, "owner")
    try:
        port = first.address.rsplit(":", 1)[1]
        out = subprocess.run(
            [sys.executable, "-m", "clusterd", "up", "--host", "127.0.0.1", "--port", port,
             "--name", "second", "--no-mdns"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "CLUSTERD_HOME": str(tmp_path / "home-second")})
        assert out.returncode != 0
        assert "port is in use" in out.stderr and "Traceback" not in out.stderr
        peer = PeerHandle(first.address)
        try:
            assert peer.info().name == "owner"  # the first still owns the port
        finally:
            peer.close()
    finally:
        first.stop()
