"""Two models on the same nodes: the main one as plan() places it, the extra where there is room."""

from dataclasses import replace

import pytest

from clusterd.models.catalog import load_config
from shard_planner.hardware import GiB, NodeSpec, parse_node_arg
from shard_planner.model_spec import LayerSpec, ModelSpec, Quantization, model_spec_from_config
from shard_planner.multi import AlsoModel, plan_many
from shard_planner.planner import budget_bytes, plan


def toy(name, n_layers, layer=GiB, kv_per_token=0):
    layers = tuple(LayerSpec(index=i, kind="dense", weight_bytes=layer, active_bytes=layer,
                             params=layer, active_params=layer, kv_bytes_per_token=kv_per_token)
                   for i in range(n_layers))
    return ModelSpec(name=name, model_type="toy", hidden_size=1024, vocab_size=1000,
                     quantization=None, dtype="bfloat16", layers=layers, embed_bytes=0,
                     embed_params=0, head_bytes=0, head_params=0, tied_embeddings=False,
                     source="config")


def nodes(*sizes, bw=400):
    return [NodeSpec(f"n{i + 1}", total_bytes=64 * GiB, usable_bytes=int(u * GiB),
                     bandwidth_gbs=bw, reserve_bytes=0) for i, u in enumerate(sizes)]


def check_memory(mp):
    """No node holds more than its limit; every stage of every model is on it."""
    for u in mp.loads:
        assert u.need_bytes + u.headroom_bytes <= u.usable_bytes
        assert u.free_bytes >= 0
        held = {(m, a, b) for m, a, b in u.stages}
        for pl in mp.models:
            for s in pl.plan.stages:
                assert ((pl.name, s.start, s.end) in held) == (s.node_index == u.node_index)
    for ml in mp.layout():
        stages = ml.stages
        assert stages[0][1] == 0 and all(a[2] == b[1] for a, b in zip(stages, stages[1:]))


def test_an_extra_model_gets_a_node_of_its_own_when_one_is_free():
    ring = nodes(5, 5, 5)
    mp = plan_many(toy("main", 8), ring, [AlsoModel(toy("small", 2))], context=1)
    check_memory(mp)
    main_nodes = {s.node_index for s in mp.main.stages}
    assert len(main_nodes) == 2
    (small,) = [m for m in mp.models if m.name == "small"]
    (stage,) = small.plan.stages
    assert stage.node_index not in main_nodes and small.plan.verdict == "fits"
    assert "of its own" in small.why[0]
    assert mp.verdict == "fits"
    # What a coordinator loads: per model, per stage (node index, layers).
    assert [(ml.model, ml.stages) for ml in mp.layout()] == [
        ("main", tuple((s.node_index, s.start, s.end) for s in mp.main.stages)),
        ("small", ((stage.node_index, 0, 2),))]


def test_beside_a_main_stage_when_no_node_is_free_and_memory_adds_up():
    ring = nodes(6, 6)
    mp = plan_many(toy("main", 8), ring, [AlsoModel(toy("small", 1, kv_per_token=1024))],
                   context=4096)
    check_memory(mp)
    (small,) = mp.models[1:]
    (stage,) = small.plan.stages
    assert "beside" in small.why[0] and "every node already holds a model" in small.why[0]
    use = mp.loads[stage.node_index]
    assert {m for m, _, _ in use.stages} == {"main", "small"}
    # Each model has its own KV cache and prompt cache there; the reserve counts once.
    main_stage = next(s for s in mp.main.stages if s.node_index == stage.node_index)
    assert stage.kv_bytes == 4096 * 1024 and stage.prompt_cache_bytes == 4096 * 1024
    assert use.need_bytes == main_stage.need_bytes + stage.need_bytes
    assert stage.reserve_bytes == 0 and stage.headroom_bytes == 0


def test_forced_onto_a_node_by_name_or_position():
    ring = nodes(7, 7, 5)
    main_only = plan(toy("main", 8), ring, context=1)
    host = main_only.stages[0].node
    mp = plan_many(toy("main", 8), ring, [AlsoModel(toy("small", 2), node=host.name)], context=1)
    check_memory(mp)
    (stage,) = mp.models[1].plan.stages
    assert stage.node.name == host.name and "as asked" in mp.models[1].why[0]
    by_position = plan_many(toy("main", 8), ring, [AlsoModel(toy("small", 2), node="3")],
                            context=1)
    assert by_position.models[1].plan.stages[0].node.name == "n3"
    with pytest.raises(ValueError, match="no node 'n9'.*n1, n2, n3"):
        plan_many(toy("main", 8), ring, [AlsoModel(toy("small", 2), node="n9")])
    with pytest.raises(ValueError, match="once"):
        plan_many(toy("main", 8), ring, [AlsoModel(toy("main", 2))])


def test_forced_onto_a_node_without_room_does_not_fit_and_says_where_it_would():
    ring = nodes(5, 5, 5)
    mp = plan_many(toy("main", 8), ring,
                   [AlsoModel(toy("small", 2), node=plan(toy("main", 8), ring).stages[0].node.name)],
                   context=1)
    small = mp.models[1]
    assert small.plan.verdict == "does-not-fit" and not small.plan.stages
    assert mp.verdict == "does-not-fit" and not mp.fits
    assert small.why[0].startswith("small does not fit on ")
    assert any("of its own" in line for line in small.why)


def test_an_extra_model_that_fits_nowhere_gets_a_verdict_and_advice():
    ring = nodes(5, 5, 5)
    big = model_spec_from_config(load_config("deepseek-r1-distill-qwen-7b"), Quantization(8, 64),
                                 name="distill-7b")
    mp = plan_many(toy("main", 10), ring, [AlsoModel(big)], context=1)
    assert mp.main.fits and mp.models[1].plan.verdict == "does-not-fit"
    assert mp.verdict == "does-not-fit"
    why = mp.models[1].why
    assert why[0].startswith("distill-7b does not fit anywhere")
    # A lower quantization is offered only when it was checked to fit in the room left.
    lower = [w for w in why if w.startswith("Lower quantization")]
    assert lower
    bits = int(lower[0].split(": ")[1].split("-bit")[0])
    alt = replace(big.with_quantization(Quantization(bits, 64)), name="distill-7b")
    assert plan_many(toy("main", 10), ring, [AlsoModel(alt)], context=1).models[1].plan.fits
    assert [ml.model for ml in mp.layout()] == ["main"]


def test_nothing_else_is_placed_when_the_main_model_does_not_fit():
    mp = plan_many(toy("main", 30), nodes(5, 5), [AlsoModel(toy("small", 1))], context=1)
    assert mp.verdict == "does-not-fit" and not mp.models[1].plan.stages
    assert "main model does not fit" in mp.models[1].why[0]


def test_r1_and_a_distill_on_three_m2_ultras():
    r1 = model_spec_from_config(load_config("deepseek-r1"), Quantization(4, 32), name="deepseek-r1")
    distill = model_spec_from_config(load_config("deepseek-r1-distill-qwen-14b"), Quantization(4, 64),
                                     name="deepseek-r1-distill-qwen-14b")
    ring = parse_node_arg("m2-ultra:192x3")
    a = plan_many(r1, ring, [AlsoModel(distill)])
    assert a == plan_many(r1, ring, [AlsoModel(distill)])  # deterministic
    check_memory(a)
    assert [s.layers for s in a.main.stages] == [s.layers for s in plan(r1, ring).stages]
    (stage,) = a.models[1].plan.stages
    assert stage.layers == (0, 48)
    # R1 fills the Studios, so the distill needs a raised limit where it goes, said once per node.
    assert a.verdict == "fits-with-wired-limit"
    for node_name, cmd in a.wired_limit_commands:
        u = next(u for u in a.loads if u.node.name == node_name)
        assert cmd.endswith(f"={u.wired_limit_mb}")
        assert budget_bytes(u.node, u.usable_bytes, a.main.headroom) >= u.need_bytes - u.node.reserve
        assert u.usable_bytes <= u.node.raisable_bytes
