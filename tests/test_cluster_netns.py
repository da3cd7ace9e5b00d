"""Zero-config discovery end to end: real `clusterd up` daemons, each in its
own network namespace ("host") on a bridge the test creates, found by real
mDNS from another namespace. Nothing here touches the machine's own
interfaces. Needs root; skipped with the reason otherwise."""

import json
import os
import secrets
import shutil
import signal
import sys
import time

import pytest

from netns import CLUSTERD, Lab, LabNode, skip_reason
from reference import mlx_lm_greedy

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
_reason = skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

SECRET = "netns-" + secrets.token_hex(20)
GIB = 2**30
LIMITS = {0: 3 * GIB, 1: 4 * GIB, 2: 5 * GIB}


@pytest.fixture(scope="module")
def lab():
    with Lab(6) as lab:  # h0-h2 nodes, h3 the client, h4 a clone, h5 a stranger
        yield lab


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netns")
    nodes = [LabNode(lab, lab.hosts[i], tmp / f"home{i}", f"mac{i}", {"CLUSTERD_SECRET": SECRET},
                     ["--memory-limit", str(LIMITS[i])]) for i in range(3)]
    yield nodes
    for n in nodes:
        n.stop()


def clusterd(lab, *args, host=3, secret=SECRET, timeout=120):
    env = {**os.environ, "CLUSTERD_SECRET": secret}
    out = lab.run(lab.hosts[host], [*CLUSTERD, *args], env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out


def nodes_json(lab, **kw):
    t0 = time.monotonic()
    report = json.loads(clusterd(lab, "nodes", "--json", "--timeout", "2", **kw).stdout)
    return report, time.monotonic() - t0


def test_nodes_from_another_host_lists_all_three(lab, cluster):
    deadline = time.monotonic() + 15
    while True:  # daemons advertise ~2 s after they listen
        report, took = nodes_json(lab)
        if len(report["nodes"]) == 3 or time.monotonic() > deadline:
            break
    got = {n["name"]: n for n in report["nodes"]}
    assert sorted(got) == ["mac0", "mac1", "mac2"], report
    for i in range(3):
        n = got[f"mac{i}"]
        assert n["address"] == f"10.77.0.{i + 1}:50051"
        assert n["usable_memory_bytes"] == LIMITS[i] and n["total_memory_bytes"] == LIMITS[i]
        assert n["state"] == "idle" and n["usable"] and n["source"] == "mdns"
    assert len({n["node_id"] for n in report["nodes"]}) == 3
    assert took < 10
    table = clusterd(lab, "nodes", "--timeout", "2").stdout
    assert "mac1" in table and "10.77.0.2:50051" in table and "4.0 GiB" in table


def test_secret_is_not_in_txt_records_or_logs(lab, cluster):
    snippet = (
        "import json\n"
        "from zeroconf import Zeroconf, ServiceBrowser, ServiceListener\n"
        "import time\n"
        "names = []\n"
        "class L(ServiceListener):\n"
        "    def add_service(self, zc, t, n): names.append(n)\n"
        "    def update_service(self, zc, t, n): pass\n"
        "    def remove_service(self, zc, t, n): pass\n"
        "zc = Zeroconf()\n"
        "ServiceBrowser(zc, '_clusterd._tcp.local.', L())\n"
        "time.sleep(2)\n"
        "out = [zc.get_service_info('_clusterd._tcp.local.', n, 3000) for n in names]\n"
        "print(json.dumps([i.text.hex() for i in out if i]))\n"
        "zc.close()\n")
    out = lab.run(lab.hosts[3], [sys.executable, "-c", snippet], timeout=60)
    records = [bytes.fromhex(h) for h in json.loads(out.stdout)]
    assert len(records) == 3
    for raw in records:
        assert SECRET.encode() not in raw and b"netns-" not in raw
    for n in cluster:
        assert SECRET not in n.log()
        assert SECRET not in (n.home / "node_id.json").read_text()


def test_node_with_another_secret_is_named_and_refused(lab, cluster, tmp_path):
    other = "other-" + secrets.token_hex(20)
    stranger = LabNode(lab, lab.hosts[5], tmp_path / "home5", "stranger", {"CLUSTERD_SECRET": other})
    try:
        deadline = time.monotonic() + 15
        while True:
            report, _ = nodes_json(lab)
            names = {n["name"] for n in report["nodes"]}
            if "stranger" in names or time.monotonic() > deadline:
                break
        (s,) = [n for n in report["nodes"] if n["name"] == "stranger"]
        assert s["state"] == "wrong secret" and not s["usable"]
        assert "stranger" in s["error"] and "10.77.0.6:50051" in s["error"]
        text = json.dumps(report)
        assert other not in text and SECRET not in text
        assert sum(n["usable"] for n in report["nodes"]) == 3
        # The stranger logged the refusals, without either secret.
        time.sleep(0.5)
        log = stranger.log()
        assert "refused /clusterd.v1.Node/" in log and "cluster secret wrong" in log
        assert other not in log and SECRET not in log
    finally:
        stranger.stop()


def test_copied_clusterd_folder_is_reported_as_duplicate(lab, cluster, tmp_path):
    clone_home = tmp_path / "clone-home"
    shutil.copytree(cluster[0].home, clone_home)
    clone = LabNode(lab, lab.hosts[4], clone_home, "mac0", {"CLUSTERD_SECRET": SECRET})
    try:
        deadline = time.monotonic() + 15
        while True:
            report, _ = nodes_json(lab)
            if report["duplicates"] or time.monotonic() > deadline:
                break
        (dup,) = report["duplicates"]
        assert sorted(dup["addresses"]) == ["10.77.0.1:50051", "10.77.0.5:50051"]
        flagged = [n for n in report["nodes"] if n["node_id"] == dup["node_id"]]
        assert len(flagged) == 2 and all(n["state"] == "duplicate id" for n in flagged)
        assert any("--new-id" in p for p in report["problems"])
        out = clusterd(lab, "nodes", "--timeout", "2")
        assert "duplicate" in out.stdout and "--new-id" in out.stderr
    finally:
        clone.stop()


def test_run_finds_the_nodes_by_mdns(lab, cluster, synthetic):
    from mlx_lm.utils import load_tokenizer

    model = synthetic("deepseek_v3", "tiny")
    prompt = "Why is the sky blue?"
    # A forced split, so every discovered node must take part (the planner
    # alone would put a model this small on the biggest node).
    out = clusterd(lab, "run", str(model), "--prompt", prompt, "--max-tokens", "16",
                   "--temp", "0", "--json", "--split", "2,2,2", timeout=300)
    report = json.loads(out.stdout)
    stages = report["stages"]
    assert sorted(s["address"] for s in stages) == [f"10.77.0.{i}:50051" for i in (1, 2, 3)]
    assert sorted(s["node"] for s in stages) == ["mac0", "mac1", "mac2"]
    tok = load_tokenizer(model)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert report["tokens"] == mlx_lm_greedy(model, ids, 16, 2048, stop_ids=tuple(tok.eos_token_ids))

    # The loaded shards were re-announced: the TXT records alone (no RPC) say so.
    browse = ("from clusterd.discovery import browse\n"
              "import json\n"
              "print(json.dumps({n.name: [n.model, n.start_layer, n.end_layer, n.state] "
              "for n in browse(2.0, expect=3)}))")
    txt = json.loads(lab.run(lab.hosts[3], [sys.executable, "-c", browse]).stdout)
    by_stage = {s["node"]: s["layers"] for s in stages}
    for name, (label, start, end, state) in txt.items():
        assert label == model.name and [start, end] == by_stage[name] and state == "ready"

    # `status` shows what each node holds now, from any host, here via eth0 by name.
    status = json.loads(clusterd(lab, "status", "--json", "--interface", "eth0").stdout)
    for n in status["nodes"]:
        assert n["memory_held_bytes"] >= [s for s in stages if s["node"] == n["name"]][0]["memory_bytes"] > 0
        assert n["model"] == model.name and n["sessions"] == []  # the run's session ended


def test_stopped_nodes_leave_the_list(lab, cluster):
    cluster[2].stop(signal.SIGTERM)  # unregisters
    report, took = nodes_json(lab)
    assert sorted(n["name"] for n in report["nodes"]) == ["mac0", "mac1"]
    assert "unregistered" in cluster[2].log()
    cluster[1].stop(signal.SIGKILL)  # no goodbye: it simply stops answering
    report, took = nodes_json(lab)
    assert [n["name"] for n in report["nodes"]] == ["mac0"]
    assert took < 10
