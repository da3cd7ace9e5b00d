"""How `clusterd doctor` judges what it saw (pure: surveys built by hand),
and its memory and disk checks for a model on real local daemons."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from clusterd.discovery import DiscoveredNode, DiscoveryResult, NodeReport
from clusterd.doctor.capacity import memory_findings
from clusterd.doctor.findings import OK, PROBLEM, WARNING
from clusterd.doctor.network import network_findings, skew_from
from clusterd.doctor.survey import NodeSeen, Survey
from clusterd.models import catalog
from shard_planner.hardware import parse_node_arg
from shard_planner.model_spec import model_spec_from_config
from shard_planner.planner import plan

INFO = SimpleNamespace(name="n")  # stands for a live NodeInfo: the node answered


def seen(name, status="ok", error=None, source="mdns", offset=0.0, tls=False):
    node = DiscoveredNode(host=f"10.0.0.{len(name)}", port=50051, node_id=name, name=name,
                          addresses=(f"10.0.0.{len(name)}",), source=source)
    report = NodeReport(node, INFO if status == "ok" else None, error, status)
    return NodeSeen(report, offset if status == "ok" else None, "10.0.0.100", "en0 (10.0.0.100)",
                    tls)


def survey(*nodes, mdns=True, client_tls=False, notes=()):
    return Survey(DiscoveryResult(tuple(n.report for n in nodes), (), tuple(notes)), tuple(nodes),
                  mdns, (), (("en0", "10.0.0.100", 24),), client_tls, "abcd1234")


def problems(findings):
    return [f for f in findings if f.level == PROBLEM]


def test_healthy_survey_has_no_problem():
    fs = network_findings(survey(seen("studio-1"), seen("studio-2")))
    assert problems(fs) == [] and not [f for f in fs if f.level == WARNING]
    assert {f.check for f in fs if f.level == OK} == {"secret", "clock"}


def test_every_node_refusing_means_this_mac_is_the_odd_one():
    wrong = "node a (10.0.0.1:50051) refused the request: this Mac's cluster secret differs"
    (f,) = problems(network_findings(survey(seen("a", "refused", wrong),
                                            seen("bb", "refused", wrong))))
    assert "every node refuses this Mac's secret (abcd1234)" in f.text
    assert f.fix.startswith("copy the cluster's secret to this Mac: `ssh 10.0.0.1 clusterd secret")


def test_missing_secret_here():
    missing = "node a refused the request: the cluster secret is missing on this side"
    (f,) = problems(network_findings(survey(seen("a", "refused", missing), seen("bb"))))
    assert "no cluster secret" in f.text and "ssh bb clusterd secret | clusterd secret --set -" in f.fix


def test_protocol_and_clock_warnings():
    old = "node a speaks protocol v0, this clusterd speaks v1: run the same clusterd version"
    fs = network_findings(survey(seen("a", "incompatible", old), seen("bb", offset=45.0)))
    (p,) = problems(fs)
    assert p.check == "protocol" and "same clusterd version" in p.fix
    (w,) = [f for f in fs if f.level == WARNING]
    assert w.check == "clock" and "+45 s" in w.text and w.fix.startswith("on bb:")


def test_two_nodes_with_one_name():
    a = seen("mini")
    b = NodeSeen(NodeReport(DiscoveredNode(host="10.0.0.9", port=50051, node_id="other",
                                           name="mini", addresses=("10.0.0.9",)), INFO),
                 0.0, None, None, False)
    (w,) = [f for f in network_findings(survey(a, b)) if f.check == "names"]
    assert w.level == WARNING and "2 nodes are named mini" in w.text and "--name" in w.fix


def test_skew_is_read_from_the_refusal():
    text = ("node x refused the request: cluster secret proof expired: the clocks of the two "
            "Macs differ by 600 s (at most 120 s allowed)")
    assert skew_from(text) == 600.0 and skew_from("cluster secret wrong") is None


def test_no_multicast_at_all():
    fs = network_findings(survey(mdns=True, notes=("mDNS could not run here (no interface); use "
                                                   "--peer HOST:PORT",)))
    assert {f.check for f in problems(fs)} == {"discovery"}
    assert any("no nodes found" in f.text for f in problems(fs))


def _r1():
    r = catalog.resolve("deepseek-r1", "4bit")
    return model_spec_from_config(r.config, r.quantization, dtype=r.dtype, name=r.name)


def test_memory_on_three_m2_ultras_names_the_sysctl():
    p = plan(_r1(), parse_node_arg("m2-ultra:192x3"), context=4096)
    (f,) = memory_findings("deepseek-r1 4bit-g32", p)
    assert f.level == WARNING and "raised GPU wired limit" in f.text
    assert "sudo sysctl iogpu.wired_limit_mb=" in f.fix and "on m2-ultra-192#2" in f.fix


def test_memory_on_seven_m4_pros_does_not_fit():
    p = plan(_r1(), parse_node_arg("m4-pro:64x7"), context=4096)
    (f,) = memory_findings("deepseek-r1 4bit-g32", p)
    assert f.level == PROBLEM and "does not fit" in f.text and "short" in f.fix


def test_doctor_with_a_model_on_local_daemons(three_nodes):
    """A small catalog model on the live nodes: it fits, each node has the
    disk for its files, and the JSON carries the plan."""
    peers = sum((["--peer", a] for a in three_nodes.addresses), [])
    out = subprocess.run([sys.executable, "-m", "clusterd", "doctor", "--no-mdns", *peers,
                          "deepseek-r1-distill-qwen-1.5b", "--quant", "4bit", "--json",
                          "--no-links-file", "--rounds", "3"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["healthy"], out.stdout
    (memory,) = [f for f in report["findings"] if f["check"] == "memory"]
    assert memory["level"] == "ok" and "fits the usable memory" in memory["text"]
    disk = [f for f in report["findings"] if f["check"] == "disk"]
    assert disk and all(f["level"] == "ok" and "has the disk" in f["text"] for f in disk)
    assert report["plan"]["verdict"] == "fits" and report["plan"]["stages"]
    assert report["links_file"] is None


def test_links_leave_out_pairs_whose_names_repeat():
    from clusterd.doctor.ring import Hop, measured_links
    from clusterd.wire import clusterd_pb2 as pb

    ok = pb.ProbeReply(reachable=True, rtt_p50_ms=0.4, rtt_p99_ms=0.9, throughput_mbps=900)
    bulk = pb.ProbeReply(reachable=True, rtt_p50_ms=4.0, throughput_mbps=9000)
    down = pb.ProbeReply(reachable=False, error="unreachable")
    a, b, twin = seen("a"), seen("bb"), seen("bb")
    links = measured_links([Hop(a, b, ok, bulk), Hop(b, twin, ok, bulk), Hop(twin, a, down),
                            Hop(a, b, ok, None)])
    assert [(l.src, l.dst, l.rtt_ms, l.throughput_mbps) for l in links] == [("a", "bb", 0.4, 9000)]


# `networksetup -listallhardwareports` on a Mac Studio (Ethernet en0, Wi-Fi en1).
MAC_STUDIO_PORTS = """
Hardware Port: Ethernet
Device: en0
Ethernet Address: 3c:a6:f6:0a:11:22

Hardware Port: Wi-Fi
Device: en1
Ethernet Address: 3c:a6:f6:0b:33:44

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: N/A

Hardware Port: Thunderbolt 1
Device: en2
Ethernet Address: 36:e0:7c:55:66:01

VLAN Configurations
===================
"""


def test_interface_kinds_and_a_node_reached_over_wifi():
    from clusterd.discovery.interfaces import parse_hardware_ports
    from clusterd.doctor.survey import interface_for

    kinds = parse_hardware_ports(MAC_STUDIO_PORTS)
    assert kinds == {"en0": "Ethernet", "en1": "Wi-Fi", "bridge0": "Thunderbolt Bridge",
                     "en2": "Thunderbolt 1"}
    interfaces = (("en0", "192.168.1.20", 24), ("en1", "192.168.8.31", 24),
                  ("bridge0", "169.254.10.2", 16))
    assert interface_for("192.168.8.7", interfaces, kinds) == "en1 Wi-Fi (192.168.8.31)"
    assert interface_for("169.254.3.3", interfaces, kinds) == "bridge0 Thunderbolt Bridge (169.254.10.2)"
    wifi = NodeSeen(seen("studio-2").report, 0.0, "192.168.8.31", "en1 Wi-Fi (192.168.8.31)")
    wired = NodeSeen(seen("studio-3").report, 0.0, "169.254.10.2",
                     "bridge0 Thunderbolt Bridge (169.254.10.2)")
    s = Survey(DiscoveryResult((wifi.report, wired.report), ()), (wifi, wired), True, (),
               interfaces, False, "abcd1234", kinds=kinds)
    warnings = [f for f in network_findings(s) if f.check == "interfaces" and f.level == WARNING]
    assert [f.nodes for f in warnings] == [("studio-2",)]
    assert "over en1 Wi-Fi" in warnings[0].text and "Thunderbolt Bridge" in warnings[0].fix
    (several,) = [f for f in network_findings(s) if f.level == "info" and f.check == "interfaces"]
    assert "studio-3 over bridge0 Thunderbolt Bridge" in several.text


def test_a_neighbour_whose_link_port_is_blocked():
    """gRPC reaches the next stage but its stage link does not (a firewall
    that allows one port and not the other): a problem, with the port to open."""
    from clusterd.doctor.ring import Hop, ring_findings
    from clusterd.wire import clusterd_pb2 as pb

    a, b = seen("a"), seen("bb")
    ok = pb.ProbeReply(reachable=True, rtt_p50_ms=0.4, rtt_p99_ms=0.9, throughput_mbps=900,
                       link_reachable=True, link_port=50052)
    blocked = pb.ProbeReply(reachable=True, rtt_p50_ms=0.4, rtt_p99_ms=0.9, throughput_mbps=900,
                            link_reachable=False, link_port=50052,
                            link_error="the stage link port 10.0.0.2:50052 cannot be reached: "
                                       "Connection refused")
    assert not problems(ring_findings([Hop(a, b, ok, None)]))
    (found,) = problems(ring_findings([Hop(a, b, blocked, None)]))
    assert "stage link" in found.text and "50052" in found.fix and "firewall" in found.fix
