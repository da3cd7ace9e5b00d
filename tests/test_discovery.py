"""Discovery with real zeroconf on loopback only (interfaces=["127.0.0.1"]),
real gRPC and real daemon processes. Other tests on this machine may
advertise on loopback at the same time, so every check filters by the node
ids this test made."""

import os
import signal
import socket
import time
import uuid

import pytest
from zeroconf import IPVersion, Zeroconf

from clusterd.cli.cluster_options import probe_node
from clusterd.discovery import (
    SERVICE_TYPE,
    TXT_KEYS,
    Advertiser,
    DiscoveredNode,
    InterfaceError,
    NodeBrowser,
    PeerError,
    browse,
    discover,
    find_duplicates,
    parse_peer,
    resolve_interfaces,
)
from clusterd.local_cluster import start_node
from clusterd.proofs import new_boot_id
from clusterd.security import SECRET_ENV
from clusterd.wire import PROTOCOL_VERSION

LO = ["127.0.0.1"]
GIB = 2**30


def info(node_id, name="n", usable=48 * GIB, **extra):
    return {"node_id": node_id, "name": name, "protocol_version": 1, "chip": "Apple M2 Ultra",
            "total_memory_bytes": 64 * GIB, "usable_memory_bytes": usable,
            "bandwidth_gbs": 800.0, "state": "idle", **extra}


def ours(node_ids):
    return lambda nodes: [n for n in nodes if n.node_id in node_ids]


def test_advertise_update_unregister():
    node_id = str(uuid.uuid4())
    mine = ours({node_id})
    with NodeBrowser(interfaces=LO) as browser, \
            Advertiser(info(node_id, "studio-1"), port=50123, boot=new_boot_id(),
                       interfaces=LO) as adv:
        assert browser.wait_for(lambda ns: len(mine(ns)) == 1, 10)
        (n,) = mine(browser.nodes())
        assert (n.name, n.address, n.chip, n.total_memory_bytes, n.usable_memory_bytes) == (
            "studio-1", "127.0.0.1:50123", "Apple M2 Ultra", 64 * GIB, 48 * GIB)
        assert n.bandwidth_gbs == 800.0 and n.state == "idle" and n.model == ""

        # A shard loaded: the record is re-announced and browsers see it.
        loaded = info(node_id, "studio-1", usable=40 * GIB, state="ready", has_shard=True,
                      shard={"model_path": "/Users/me/models/DeepSeek-R1-4bit",
                             "start_layer": 0, "end_layer": 20, "num_layers": 61})
        assert adv.update(loaded) is True
        assert adv.update(loaded) is False  # nothing changed, nothing sent
        assert browser.wait_for(lambda ns: any(x.model for x in mine(ns)), 10)
        (n,) = mine(browser.nodes())
        assert (n.model, n.start_layer, n.end_layer, n.num_layers, n.state) == (
            "DeepSeek-R1-4bit", 0, 20, 61, "ready")
        assert n.usable_memory_bytes == 40 * GIB
        assert "/Users/me" not in str(n)  # local paths stay local

        adv.close()
        t0 = time.monotonic()
        assert browser.wait_for(lambda ns: not mine(ns), 5)
        assert time.monotonic() - t0 < 3  # goodbye packets, not a TTL expiry


def test_txt_record_has_only_known_keys_and_no_secret(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "txt-test-secret-0123456789")
    node_id = str(uuid.uuid4())
    boot = new_boot_id()
    with Advertiser(info(node_id), port=50124, boot=boot, interfaces=LO) as adv:
        zc = Zeroconf(interfaces=LO, ip_version=IPVersion.V4Only)
        try:
            record = zc.get_service_info(SERVICE_TYPE, adv.service_name, timeout=5000)
        finally:
            zc.close()
    assert record is not None
    keys = {k.decode() for k in record.properties}
    assert keys == TXT_KEYS
    raw = record.text
    assert b"txt-test-secret" not in raw
    assert record.properties[b"id"] == node_id.encode()
    assert record.properties[b"boot"] == boot.encode()  # the boot id proofs are bound to


def test_duplicate_ids_are_reported_not_merged():
    node_id = str(uuid.uuid4())
    same = info(node_id, "clone")
    with Advertiser(same, port=50125, boot=new_boot_id(), interfaces=LO) as a, \
            Advertiser(same, port=50126, boot=new_boot_id(), interfaces=LO) as b:
        assert a.service_name != b.service_name  # never one merged record
        with NodeBrowser(interfaces=LO) as browser:
            assert browser.wait_for(lambda ns: len(ours({node_id})(ns)) == 2, 10)
            nodes = ours({node_id})(browser.nodes())
    assert sorted(n.port for n in nodes) == [50125, 50126]
    (dup,) = find_duplicates(nodes)
    assert dup.node_id == node_id and len(dup.nodes) == 2
    assert "--new-id" in dup.message() and node_id in dup.message()


def test_same_node_seen_twice_is_not_a_duplicate():
    a = DiscoveredNode(host="10.0.0.2", port=1, node_id="x", addresses=("10.0.0.2", "192.168.1.2"),
                       instance="n-x._clusterd._tcp.local.", boot="b1")
    peer = DiscoveredNode(host="192.168.1.2", port=1, node_id="x", addresses=("192.168.1.2",),
                          source="peer")
    assert find_duplicates([a, a, peer]) == ()
    restarted_twin = DiscoveredNode(host="10.0.0.3", port=1, node_id="x", addresses=("10.0.0.3",),
                                    instance="n-x-2._clusterd._tcp.local.", boot="b2")
    assert len(find_duplicates([a, restarted_twin])) == 1


def test_parse_peer_and_interfaces():
    assert parse_peer("10.0.0.2:50051") == ("10.0.0.2", 50051)
    assert parse_peer("studio.local", default_port=7) == ("studio.local", 7)
    for bad in ("10.0.0.2:x", "10.0.0.2:0", ":5"):
        with pytest.raises(PeerError):
            parse_peer(bad)
    assert resolve_interfaces(["127.0.0.1"]) == ["127.0.0.1"]
    assert resolve_interfaces(["lo"]) == ["127.0.0.1"]
    assert resolve_interfaces([]) is None
    with pytest.raises(InterfaceError, match="no IPv4 interface '10.254.254.254'"):
        resolve_interfaces(["10.254.254.254"])


# -- real daemon processes -------------------------------------------------------


@pytest.fixture
def mdns_node(tmp_path):
    node = start_node(tmp_path, f"disc-{uuid.uuid4().hex[:6]}", mdns=True)  # --host 127.0.0.1
    yield node
    node.stop()


def _node_id(node):
    return probe_node(node.address).node_id


def test_crashed_node_leaves_the_list_by_health_check(mdns_node):
    node_id = _node_id(mdns_node)
    mine = ours({node_id})

    def health(n: DiscoveredNode) -> None:
        probe_node(n.address, timeout=1.0)

    with NodeBrowser(interfaces=LO, health=health, health_interval=0.5) as browser:
        assert browser.wait_for(lambda ns: len(mine(ns)) == 1, 15)
        time.sleep(1.5)  # a healthy node stays
        assert len(mine(browser.nodes())) == 1
        os.kill(mdns_node.pid, signal.SIGKILL)  # no goodbye: its records stay cached
        t0 = time.monotonic()
        assert browser.wait_for(lambda ns: not mine(ns), 10)
        assert time.monotonic() - t0 < 5


def test_discover_verifies_mdns_nodes_and_peers(mdns_node, tmp_path, monkeypatch):
    node_id = _node_id(mdns_node)
    plain = start_node(tmp_path, "peer-only")  # --no-mdns: only reachable as a peer
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
        peer_id = _node_id(plain)
        result = discover(probe_node, timeout=3, interfaces=LO,
                          peers=[plain.address, mdns_node.address, dead],
                          protocol_version=PROTOCOL_VERSION)
        by_id = {r.node.node_id: r for r in result.reports}
        assert by_id[node_id].usable and by_id[node_id].node.source == "mdns"  # merged, not twice
        assert sum(r.node.node_id == node_id for r in result.reports) == 1
        assert by_id[peer_id].usable and by_id[peer_id].node.name == "peer-only"
        assert by_id[peer_id].node.usable_memory_bytes > 0  # live figures from Info
        (bad,) = [r for r in result.reports if r.node.address == dead]
        assert bad.status == "unreachable" and dead in bad.error

        # The same node with the wrong secret is found but refused, by name.
        monkeypatch.setenv(SECRET_ENV, "a-different-secret-0123456789")
        result = discover(probe_node, mdns=False, peers=[plain.address])
        (r,) = result.reports
        assert r.status == "refused" and not r.usable
        assert plain.address in r.error and "secret" in r.error
        assert os.environ[SECRET_ENV] not in r.error
    finally:
        plain.stop()
