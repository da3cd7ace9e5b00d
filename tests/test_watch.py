"""A node re-announces itself when its usable memory moves."""

import threading
import uuid
from dataclasses import replace
from types import SimpleNamespace

from clusterd.discovery import NodeBrowser
from clusterd.local_cluster import start_node
from clusterd.node.resources import Resources
from clusterd.node.watch import ResourceWatch, moved

GiB = 2**30
M2_ULTRA = Resources(chip="Apple M2 Ultra", total_bytes=192 * GiB, usable_bytes=144 * GiB,
                     bandwidth_gbs=800.0, free_disk_bytes=GiB, platform="Darwin arm64")


def test_what_counts_as_a_move():
    assert moved(144 * GiB, 148 * GiB)            # `sudo sysctl iogpu.wired_limit_mb=151552`
    assert not moved(144 * GiB, 144 * GiB + 2**20)
    assert not moved(22 * GiB, 22 * GiB + 300 * 2**20)  # Linux: available memory wanders
    assert moved(GiB // 2, GiB)


def test_a_raised_wired_limit_is_announced():
    answers = [M2_ULTRA, replace(M2_ULTRA, usable_bytes=148 * GiB)]
    service = SimpleNamespace(resources=M2_ULTRA)
    announced = []
    watch = ResourceWatch(service, lambda: answers.pop(0), lambda: announced.append(
        service.resources.usable_bytes), threading.Event())
    assert not watch.check() and announced == []
    assert watch.check() and announced == [148 * GiB]
    assert service.resources.usable_bytes == 148 * GiB  # Info and LoadShard see it too


def test_a_failing_probe_changes_nothing():
    def broken():
        raise OSError("sysctl gone")
    service = SimpleNamespace(resources=M2_ULTRA)
    assert not ResourceWatch(service, broken, lambda: None, threading.Event()).check()
    assert service.resources is M2_ULTRA


def test_daemon_reannounces_when_memory_moves(tmp_path):
    """Real daemon, real mDNS on loopback: this process takes 3 GiB, the
    node's usable (available) memory drops, and its TXT record follows."""
    node = start_node(tmp_path, f"watch-{uuid.uuid4().hex[:6]}", mdns=True)
    try:
        with NodeBrowser(interfaces=["127.0.0.1"]) as browser:
            def mine(nodes):
                return [n for n in nodes if n.name == node.name]
            assert browser.wait_for(lambda ns: bool(mine(ns)), 15)
            before = mine(browser.nodes())[0].usable_memory_bytes
            ballast = bytearray(3 * GiB)  # touched: zero-filled pages are really taken
            for i in range(0, len(ballast), 4096):
                ballast[i] = 1
            try:
                assert browser.wait_for(
                    lambda ns: bool(mine(ns)) and mine(ns)[0].usable_memory_bytes
                    < before - 2 * GiB, 20)
            finally:
                del ballast
    finally:
        node.stop()
    assert "re-announcing" in node.log()
