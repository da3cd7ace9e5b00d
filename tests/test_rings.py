"""What a re-plan on shared nodes sees: each shard's reservation as the node
counts it, taken off the node's usable memory for the other models (never
for the model's own shard), and the model's shard unloaded where a new
placement leaves it out. Over a real daemon holding two shards."""

from types import SimpleNamespace

import pytest

from clusterd.coordinator.cluster import Node, SplitError, connect, load_ring
from clusterd.coordinator.ring import RingOptions
from clusterd.coordinator.rings import SharedRoom, Wanted, forced_nodes, reserved_bytes
from clusterd.local_cluster import LocalCluster
from clusterd.wire import clusterd_pb2 as pb
from shard_planner.model_spec import model_spec_from_dir

OPTS = RingOptions(context=512, sessions=2, prefill_step_size=32)


def test_a_replan_sees_what_the_other_model_reserves(synthetic, tmp_path):
    models = {"r1": synthetic("deepseek_v3", "tiny"), "distill": synthetic("qwen2", "tiny")}
    specs = {name: model_spec_from_dir(path) for name, path in models.items()}
    with LocalCluster(1, workdir=tmp_path, prefix="room") as cluster:
        nodes = connect(cluster.addresses)
        held = {}  # shard -> what the node said it reserves when it loaded it
        for name, path in models.items():
            load_ring(path, nodes, [(0, specs[name].num_layers)],
                      lambda node, reply: held.update({reply.shard.shard:
                                                       reply.memory_held_bytes}),
                      limits=OPTS.limits, shard=name, prompt_cache_tokens=OPTS.cache_tokens)
        info = nodes[0].peer.info()
        for s in info.shards:
            assert reserved_bytes(s, specs[s.shard]) == held[s.shard]
            assert s.weight_bytes < reserved_bytes(s, None) <= held[s.shard]

        room = SharedRoom(specs)
        usable = info.usable_memory_bytes
        for own, other in (("r1", "distill"), ("distill", "r1")):
            [view] = room.views(nodes, own)
            assert view.peer is nodes[0].peer
            assert view.info.usable_memory_bytes == usable - held[other]

        [view] = room.views(nodes, "r1")
        room.release([view], [None], "r1")  # a new placement without this node
        assert [s.shard for s in nodes[0].peer.info().shards] == ["distill"]
        nodes[0].peer.close()


def fake_nodes(*names: str) -> list[Node]:
    return [Node(SimpleNamespace(address=f"10.0.0.{i}:50051"), pb.NodeInfo(name=n))
            for i, n in enumerate(names, 1)]


def test_a_forced_node_by_name_address_or_position():
    nodes = fake_nodes("mini", "studio")
    wanted = [Wanted("r1", None), Wanted("a", None, "studio"), Wanted("b", None, "10.0.0.1:50051"),
              Wanted("c", None, "2")]
    assert forced_nodes(wanted, nodes) == [None, "studio", "mini", "studio"]
    twins = fake_nodes("mac", "mac")  # one name twice: the position says which
    assert forced_nodes([Wanted("a", None, "10.0.0.2:50051")], twins) == ["2"]
    with pytest.raises(SplitError) as e:
        forced_nodes([Wanted("a", None, "nowhere")], nodes)
    assert "no node 'nowhere' among the nodes (mini (10.0.0.1:50051), studio" in str(e.value)
