"""R1 beside a distill on the same nodes, one endpoint (`serve --also`).

Two daemons whose --memory-limits make the shard planner split a tiny
synthetic R1 (DeepSeek-V3) 1 + 5 layers and put a tiny synthetic distill
(Qwen2) whole beside R1's second stage: the node both models share. Each
request is answered by the model it names, as mlx-lm answers on that
model; `clusterd plan --also` on the same nodes says the same placement.
When the shared node dies both models are 503s naming it, and when it is
back both answer again, serve never restarted. And the refusals: an --also
model that fits nowhere, and an --also on a node that is not there."""

import json
import subprocess
import sys

import pytest

from clusterd.coordinator.peers import PeerHandle
from clusterd.local_cluster import LocalCluster
from serving import rawhttp
from serving.answers import ASK, answer, answer_when_back, client
from serving.conftest import Model
from serving.serverproc import run_serve, start_serve

PREFILL = 32  # a small prefill workspace: the models' weights and KV decide the split
FLAGS = ("--context", "512", "--sessions", "1", "--prefill-step-size", str(PREFILL))
LIMITS = ("4M", "9.75M")  # see the module docstring; `clusterd plan` shows the numbers
FORCED_LIMITS = ("6.25M", "15.5M")  # the distill would go beside stage 2; fits beside stage 1


@pytest.fixture(scope="module")
def r1(synthetic):
    return Model(synthetic("deepseek_v3", "tiny"), PREFILL)


@pytest.fixture(scope="module")
def distill(synthetic):
    return Model(synthetic("qwen2", "tiny"), PREFILL)


def limited(tmp, prefix: str, limits) -> LocalCluster:
    return LocalCluster(2, workdir=tmp / prefix, prefix=prefix,
                        node_extra=[["--memory-limit", m] for m in limits])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with limited(tmp_path_factory.mktemp("shared"), "shared", LIMITS) as cluster:
        yield cluster


def shards(address: str) -> dict[str, tuple[int, int]]:
    """What the node holds now: shard name -> layers."""
    peer = PeerHandle(address)
    try:
        return {s.shard: (s.start_layer, s.end_layer) for s in peer.info().shards}
    finally:
        peer.close()


def stages(port: int) -> dict[str, list[tuple[str, list[int]]]]:
    """/health: per model, (address, layers) of each stage."""
    body = rawhttp.get(port, "/health").json()
    return {row["model"]: [(st["address"], st["layers"]) for st in row["stages"]]
            for row in body["models"]}


def planned(addresses, main: Model, also: str) -> dict[str, list[tuple[str, list[int]]]]:
    """`clusterd plan MAIN --also ALSO` on these nodes: per model, (address, layers)."""
    done = subprocess.run(
        [sys.executable, "-m", "clusterd", "plan", str(main.path), "--also", also,
         *sum((["--peer", a] for a in addresses), []), *FLAGS, "--json"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {m["model"]: [(st["address"], st["layers"]) for st in m["stages"]]
            for m in json.loads(done.stdout)["layout"]}


# -- refusals first: the nodes hold nothing yet -----------------------------------

def test_an_also_model_that_fits_nowhere_is_refused_before_anything_is_loaded(
        synthetic, pair, r1):
    big = synthetic("deepseek_v3", "tiny", seed=1)  # another R1: no node has room left
    done = run_serve(r1.path, pair.addresses, *FLAGS, "--also", str(big))
    assert done.returncode != 0, done.stderr
    assert f"{big.name} cannot be served beside {r1.name}" in done.stderr, done.stderr
    assert "does not fit anywhere" in done.stderr and "nothing was loaded" in done.stderr
    assert "Traceback" not in done.stderr
    assert all(shards(a) == {} for a in pair.addresses)


def test_an_also_on_a_node_that_is_not_there_is_refused(pair, r1, distill):
    done = run_serve(r1.path, pair.addresses, *FLAGS, "--also", f"{distill.path}@nowhere")
    assert done.returncode != 0, done.stderr
    assert "no node 'nowhere' among the nodes" in done.stderr, done.stderr
    assert f"shared0 ({pair.addresses[0]})" in done.stderr
    assert "Traceback" not in done.stderr
    assert all(shards(a) == {} for a in pair.addresses)


# -- both models served, the distill where the planner put it ----------------------

@pytest.fixture(scope="module")
def served(pair, r1, distill, tmp_path_factory):
    log = tmp_path_factory.mktemp("shared-serve") / "serve.log"
    server = start_serve(r1.path, pair.addresses, log, *FLAGS, "--also", str(distill.path))
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def test_each_model_answers_from_the_nodes_it_shares(served, pair, r1, distill):
    a = pair.addresses
    assert stages(served.port) == {r1.name: [(a[0], [0, 1]), (a[1], [1, 6])],
                                   distill.name: [(a[1], [0, 4])]}
    assert shards(a[1]) == {r1.name: (1, 6), distill.name: (0, 4)}  # both, on the shared node
    log = served.log()
    assert f"{distill.name}: shared1 layers [0, 4)" in log
    assert f"{distill.name} on shared1, beside the stages there" in log
    c = client(served.url)
    expected = {m.name: m.chat_reference(ASK, 8)[:2] for m in (r1, distill)}
    assert expected[r1.name] != expected[distill.name]  # the models do differ
    for m in (distill, r1, distill):
        assert answer(c, m.name) == expected[m.name]


def test_plan_says_what_serve_placed(served, pair, r1, distill):
    assert planned(pair.addresses, r1, str(distill.path)) == stages(served.port)


def test_both_models_come_back_after_their_shared_node_died(served, pair, r1, distill):
    c = client(served.url)
    expected = {m.name: m.chat_reference(ASK, 8)[:2] for m in (r1, distill)}
    pair.nodes[1].proc.kill()
    pair.nodes[1].proc.wait()
    for m in (r1, distill):
        reply = rawhttp.post(served.port, "/v1/chat/completions",
                             {"model": m.name, "messages": ASK, "max_tokens": 4})
        assert reply.status == 503, reply.body
        assert f"node shared1 ({pair.addresses[1]}) dropped out" in reply.message, reply.message
    pair.restart(1)
    for m in (r1, distill):
        assert answer_when_back(c, m.name) == expected[m.name]
    # Both on it again (R1's split may differ: each ring re-forms on what the other left).
    assert set(shards(pair.addresses[1])) == {r1.name, distill.name}
    assert served.proc.poll() is None


# -- forced with @NODE --------------------------------------------------------------

def test_an_also_model_goes_on_the_node_it_names(tmp_path, r1, distill):
    with limited(tmp_path, "forced", FORCED_LIMITS) as cluster:
        a = cluster.addresses
        # Left to itself, the planner puts the distill beside R1's second stage.
        assert planned(a, r1, str(distill.path))[distill.name] == [(a[1], [0, 4])]
        server = start_serve(r1.path, a, tmp_path / "serve.log", *FLAGS,
                             "--also", f"{distill.path}@{a[0]}")
        try:
            assert stages(server.port) == {r1.name: [(a[0], [0, 1]), (a[1], [1, 6])],
                                           distill.name: [(a[0], [0, 4])]}
            assert shards(a[0]) == {r1.name: (0, 1), distill.name: (0, 4)}
            assert f"{distill.name} on forced0, as asked" in server.log()
            assert planned(a, r1, f"{distill.path}@{a[0]}") == stages(server.port)
            c = client(server.url)
            for m in (r1, distill):
                assert answer(c, m.name) == m.chat_reference(ASK, 8)[:2]
        finally:
            assert server.stop() == 0, server.log()
