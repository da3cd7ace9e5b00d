"""`clusterd doctor` on "hosts" in network namespaces, as a person debugging a
cluster meets them: a healthy cluster reports nothing wrong; then, at once, a
node whose mDNS does not reach this Mac, a node its ring neighbour cannot
reach although the coordinator can, a node with another secret, one with a
skewed clock and one serving TLS to plaintext clients: each is reported with
its fix. Needs root; skipped with the reason otherwise."""

import json
import os
import secrets
import subprocess
import time

import pytest

from netns import CLUSTERD, Lab, LabNode, _ip, skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
_reason = skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

SECRET = "doctor-" + secrets.token_hex(20)
CLIENT = 3


@pytest.fixture(scope="module")
def lab():
    # h0-h2 the ring, h3 this Mac, h4 a stranger, h5 a skewed clock, h6 TLS, h7 a quiet node
    with Lab(8) as lab:
        yield lab


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    return tmp_path_factory.mktemp("doctor")


@pytest.fixture(scope="module")
def ring(lab, homes):
    nodes = [LabNode(lab, lab.hosts[i], homes / f"home{i}", f"mac{i}",
                     {"CLUSTERD_SECRET": SECRET}) for i in range(3)]
    yield nodes
    for n in nodes:
        n.stop()


def doctor(lab, homes, *args, timeout=120):
    env = {**os.environ, "CLUSTERD_SECRET": SECRET, "CLUSTERD_HOME": str(homes / "client")}
    out = lab.run(lab.hosts[CLIENT], [*CLUSTERD, "doctor", "--json", "--timeout", "3",
                                      "--rounds", "5", *args], env=env, timeout=timeout)
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def wait_for_mdns(lab, homes, names, deadline_s=20):
    """Daemons advertise ~2 s after they listen."""
    env = {**os.environ, "CLUSTERD_SECRET": SECRET, "CLUSTERD_HOME": str(homes / "client")}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        out = lab.run(lab.hosts[CLIENT], [*CLUSTERD, "nodes", "--json", "--timeout", "2"], env=env)
        seen = {n["name"] for n in json.loads(out.stdout)["nodes"]} if out.stdout else set()
        if set(names) <= seen:
            return
    raise AssertionError(f"mDNS never showed {names}")


def by_check(report, check):
    return [f for f in report["findings"] if f["check"] == check]


def test_a_healthy_cluster_reports_nothing_wrong(lab, homes, ring):
    wait_for_mdns(lab, homes, ["mac0", "mac1", "mac2"])
    code, report = doctor(lab, homes)
    assert code == 0 and report["healthy"], report["findings"]
    assert report["problems"] == 0 and report["warnings"] == 0, report["findings"]
    assert {n["name"] for n in report["nodes"]} == {"mac0", "mac1", "mac2"}
    assert all(n["source"] == "mdns" and n["local_interface"].startswith("eth0")
               for n in report["nodes"])
    # Each neighbour measured from the node before it, and written for the planner.
    pairs = {(l["from"], l["to"]) for l in report["links"]}
    assert pairs == {("mac0", "mac1"), ("mac1", "mac2"), ("mac2", "mac0")}
    saved = json.loads((homes / "client" / "links.json").read_text())
    assert {(l["from"], l["to"]) for l in saved["links"]} == pairs and saved["measured_at"]
    assert all(l["rtt_ms"] > 0 and l["throughput_mbps"] > 0 for l in saved["links"])


def test_one_node_under_two_addresses_is_one_node(lab, homes, ring):
    """mac0 also answers at a second address (as a Mac on Ethernet and
    Thunderbolt Bridge does): counted once, not reported as a duplicate."""
    _ip("-n", lab.hosts[0].ns, "addr", "add", "10.77.0.101/24", "dev", "eth0")
    code, report = doctor(lab, homes, "--no-mdns", "--peer", "10.77.0.1:50051",
                          "--peer", "10.77.0.101:50051", "--peer", ring[1].address)
    assert code == 0, report["findings"]
    (mac0,) = [n for n in report["nodes"] if n["name"] == "mac0"]
    assert set(mac0["addresses"]) == {"10.77.0.1", "10.77.0.101"}
    assert not by_check(report, "duplicate")
    assert any("counted once" in f["text"] for f in by_check(report, "discovery"))


@pytest.fixture(scope="module")
def broken(lab, homes, ring, tmp_path_factory):
    """Everything that goes wrong at once, then one doctor run."""
    tls = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem"),
                    "-subj", "/CN=clusterd", "-addext", "subjectAltName=DNS:clusterd"],
                   check=True, capture_output=True, timeout=60)
    h = lab.hosts
    extra = [
        LabNode(lab, h[4], homes / "home4", "stranger", {"CLUSTERD_SECRET": "other-" + SECRET}),
        LabNode(lab, h[5], homes / "home5", "skewed",
                {"CLUSTERD_SECRET": SECRET, "CLUSTERD_TEST_CLOCK_OFFSET_S": "600"}),
        LabNode(lab, h[6], homes / "home6", "secure", {"CLUSTERD_SECRET": SECRET},
                ["--tls-cert", str(tls / "cert.pem"), "--tls-key", str(tls / "key.pem")]),
        # Advertises on its loopback only: mDNS never leaves its host, --peer reaches it.
        LabNode(lab, h[7], homes / "home7", "quiet", {"CLUSTERD_SECRET": SECRET},
                ["--interface", "127.0.0.1"]),
    ]
    # mac1 cannot reach mac2 (its own routing refuses it); this Mac reaches both.
    _ip("-n", h[1].ns, "route", "add", "prohibit", f"{h[2].address}/32")
    try:
        wait_for_mdns(lab, homes, ["mac0", "mac1", "mac2", "stranger", "skewed", "secure"])
        yield doctor(lab, homes, "--peer", extra[3].address)
    finally:
        _ip("-n", h[1].ns, "route", "del", "prohibit", f"{h[2].address}/32", check=False)
        for n in extra:
            n.stop()


def only(findings, name):
    got = [f for f in findings if f["level"] == "problem" and name in " ".join(f["nodes"])]
    assert got, f"nothing about {name}: {findings}"
    assert all(f["fix"] for f in got)
    return got


def test_broken_cluster_exits_non_zero(broken):
    code, report = broken
    assert code == 1 and not report["healthy"]


def test_blocked_multicast(broken):
    _, report = broken
    (f,) = only(by_check(report, "discovery"), "quiet")
    assert "mDNS does not show quiet" in f["text"] and "--peer reaches it" in f["text"]
    assert "--peer 10.77.0.8:50051" in f["fix"] and "Ethernet or Thunderbolt Bridge" in f["fix"]


def test_neighbour_that_cannot_reach_the_next(broken):
    _, report = broken
    (f,) = [f for f in by_check(report, "ring") if f["level"] == "problem"]
    assert f["nodes"] == ["mac1", "mac2"]
    assert "mac1 cannot reach mac2 at 10.77.0.3:50051, though this Mac reaches both" in f["text"]
    assert "firewall" in f["fix"] and "route to 10.77.0.3" in f["fix"]
    # The other hops of the ring were measured.
    assert {("mac0", "mac1")} <= {(l["from"], l["to"]) for l in report["links"]}


def test_wrong_secret(broken):
    _, report = broken
    (f,) = only(by_check(report, "secret"), "stranger")
    assert "cluster secret wrong: stranger refuses this Mac's secret" in f["text"]
    assert all(name in f["text"].split("agrees with")[1] for name in ("mac0", "mac1", "mac2"))
    assert "clusterd secret | ssh 10.77.0.5 clusterd secret --set -" in f["fix"]


def test_skewed_clock(broken):
    _, report = broken
    (f,) = only(by_check(report, "clock"), "skewed")
    assert "differ by 600 s" in f["text"] and "refuses every call" in f["text"]
    assert f["fix"].startswith("on skewed:") and "Set time automatically" in f["fix"]


def test_tls_mismatch(broken):
    _, report = broken
    found = only(by_check(report, "tls"), "secure")
    texts = " ".join(f["text"] for f in found)
    assert "serves TLS, but this Mac calls without it" in texts
    assert "TLS on some nodes and not others: TLS on secure" in texts
    assert any("tls" in f["fix"] for f in found)
    (secure,) = [n for n in report["nodes"] if n["name"] == "secure"]
    assert secure["serves_tls"] and secure["advertises_tls"]
