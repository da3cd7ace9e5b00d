"""Nodes outlive a coordinator that vanishes mid-generation: its sessions
are freed within seconds and the ring serves the next run."""

import json
import os
import signal
import subprocess
import sys
import time

from clusterd.coordinator.peers import PeerHandle


def wait_for(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def run_cmd(model, addresses, *extra):
    return [sys.executable, "-m", "clusterd", "run", str(model),
            *sum((["--peer", a] for a in addresses), []), "--temp", "0", "--raw", *extra]


def test_killed_coordinator_frees_sessions_and_nodes_serve_on(three_nodes, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    peers = [PeerHandle(a) for a in three_nodes.addresses]
    # Greedy on this model from "a" runs 2137 tokens before its stop token:
    # still generating when it is killed.
    coordinator = subprocess.Popen(
        run_cmd(model, three_nodes.addresses, "--prompt", "a", "--context", "8192",
                "--max-tokens", "8000"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        generating = wait_for(lambda: all(p.info().sessions for p in peers)
                              and max((s.tokens for s in peers[0].info().sessions), default=0) > 20,
                              timeout=120)
        assert generating, "the run never got going"
        held = [p.info().memory_held_bytes for p in peers]
        weights = [p.info().shard.weight_bytes for p in peers]
        assert all(h > w for h, w in zip(held, weights))  # KV caches are held
    finally:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
    t0 = time.monotonic()
    assert wait_for(lambda: not any(p.info().sessions for p in peers), timeout=10)
    assert time.monotonic() - t0 < 10
    assert [p.info().memory_held_bytes for p in peers] == weights
    out = subprocess.run(run_cmd(model, three_nodes.addresses, "--prompt", "again",
                                 "--max-tokens", "8", "--json"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) == 8
    for p in peers:
        p.close()
