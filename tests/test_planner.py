"""The split: memory limits, bandwidth-aware placement, verdicts and advice, exactness."""

import time
from dataclasses import replace
from fractions import Fraction

import pytest

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clusterd.models.catalog import load_config
from shard_planner.costs import get_link, hop_seconds
from shard_planner.hardware import (GiB, MiB, NodeSpec, hypothetical_node, parse_node_arg,
                                    safe_max_wired_bytes)
from shard_planner.model_spec import (LayerSpec, ModelSpec, MtpSpec, Quantization,
                                      model_spec_from_config)
from shard_planner.planner import StageCosts, budget_bytes, plan, solve, solve_pairs

R1 = load_config("deepseek-r1")
R1_4BIT = model_spec_from_config(R1, Quantization(4, 32), name="deepseek-r1")


def toy_spec(layer_bytes, active_share=1.0, kv_per_token=0, embed=0, head=0, tied=False,
             vocab=1000):
    layers = tuple(
        LayerSpec(index=i, kind="dense", weight_bytes=b, active_bytes=int(b * active_share),
                  params=b, active_params=b, kv_bytes_per_token=kv_per_token)
        for i, b in enumerate(layer_bytes))
    return ModelSpec(name="toy", model_type="toy", hidden_size=64, vocab_size=vocab,
                     quantization=None, dtype="bfloat16", layers=layers, embed_bytes=embed,
                     embed_params=embed, head_bytes=head, head_params=head,
                     tied_embeddings=tied, source="config")


def node(name, usable_gib, bw=None, macos=False, total_gib=None, reserve=0):
    total = int((total_gib or usable_gib) * GiB)
    return NodeSpec(name=name, total_bytes=total, usable_bytes=int(usable_gib * GiB),
                    bandwidth_gbs=bw, macos=macos, reserve_bytes=reserve)


def check_plan(p):
    """Invariants of any plan that fits."""
    assert p.stages
    assert p.stages[0].start == 0 and p.stages[-1].end == p.model.num_layers
    for a, b in zip(p.stages, p.stages[1:]):
        assert a.end == b.start  # every layer exactly once, in order
        assert a.node_index < b.node_index  # the ring order the user gave
    for s in p.stages:
        assert s.start < s.end
        assert s.need_bytes + s.headroom_bytes <= s.usable_bytes  # never over a node
        assert s.usable_bytes <= max(s.node.raisable_bytes, s.node.usable_bytes)
        if s.wired_limit_mb is None:
            assert s.usable_bytes == s.node.usable_bytes
        else:
            assert p.verdict == "fits-with-wired-limit"
            assert s.node.usable_bytes < s.usable_bytes == s.wired_limit_mb * MiB
            if s.node.max_wired_bytes is None:  # never past the safe default cap
                assert s.usable_bytes <= safe_max_wired_bytes(s.node.total_bytes)


def test_the_three_clusters_people_ask_about():
    clusters = {arg: plan(R1_4BIT, parse_node_arg(arg))
                for arg in ("m2-ultra:192x3", "m4-pro:64x7", "m4-max:128x3")}
    for arg, p in clusters.items():
        nodes = p.nodes
        now = sum(budget_bytes(n, n.usable_bytes, p.headroom) for n in nodes)
        most = sum(budget_bytes(n, n.raisable_bytes, p.headroom) for n in nodes)
        if p.fits:
            check_plan(p)
        if p.verdict == "fits":
            assert now >= R1_4BIT.total_weight_bytes
        if now < R1_4BIT.total_weight_bytes:
            assert p.verdict != "fits"  # the weights alone exceed what the nodes offer now
        if most < R1_4BIT.total_weight_bytes:
            assert p.verdict == "does-not-fit" and p.shortfall_bytes > 0
    # 7 x 64 GB cannot hold 390.7 GiB even with every limit at RAM minus macOS's share.
    assert clusters["m4-pro:64x7"].verdict == "does-not-fit"


def test_slower_nodes_get_fewer_bytes():
    spec = toy_spec([GiB] * 10)
    for order in ((0, 1), (1, 0)):
        pair = [node("slow", 8.5, bw=273), node("fast", 8.5, bw=800)]
        p = plan(spec, [pair[i] for i in order], context=1)
        check_plan(p)
        by = {s.node.name: s for s in p.stages}
        assert set(by) == {"slow", "fast"}  # the model needs both
        assert by["fast"].weight_bytes > by["slow"].weight_bytes
        assert by["fast"].active_bytes > by["slow"].active_bytes
        # Every other split that fits would be slower: compare with the even one.
        even = sum(b for b in (5 * GiB / 273, 5 * GiB / 800))
        ours = by["slow"].active_bytes / 273 + by["fast"].active_bytes / 800
        assert ours < even


def test_a_single_fast_node_beats_a_pipeline():
    spec = toy_spec([GiB] * 6)
    p = plan(spec, [node("slow", 4, bw=100), node("fast", 10, bw=800)], context=1)
    assert [s.node.name for s in p.stages] == ["fast"]
    assert any("slow is left out" in a and "hop" in a for a in p.advice)


def test_a_node_too_small_to_matter_is_left_out():
    # 2 GiB cannot hold even a dense R1 layer with its prefill workspace.
    nodes = [hypothetical_node("m2-ultra", 192, "a"), node("tiny", 2, bw=68, macos=False),
             hypothetical_node("m2-ultra", 192, "b"), hypothetical_node("m2-ultra", 192, "c")]
    p = plan(R1_4BIT, nodes)
    check_plan(p)
    assert "tiny" in p.left_out and "tiny" not in {s.node.name for s in p.stages}
    assert any(a.startswith("tiny is left out: too small") for a in p.advice)


def test_unknown_bandwidth_splits_a_tiny_model_by_memory_over_every_node():
    """Linux test nodes: no bandwidth, usable = free RAM, a 5 MB synthetic model."""
    spec = toy_spec([1_200_000] * 4, kv_per_token=512, embed=500_000, head=500_000)
    nodes = [NodeSpec(f"n{i}", total_bytes=64 * GiB, usable_bytes=u * GiB)
             for i, u in enumerate((20, 40, 30))]
    p = plan(spec, nodes, context=4096)
    check_plan(p)
    assert p.verdict == "fits" and p.objective == "memory"
    assert [s.node.name for s in p.stages] == ["n0", "n1", "n2"]
    assert any("split by memory" in a for a in p.advice)


def test_infeasible_inputs_get_does_not_fit_with_useful_advice():
    p = plan(R1_4BIT, parse_node_arg("m4-max:128x3"), context=8192)
    assert p.verdict == "does-not-fit" and not p.stages and p.shortfall_bytes > 0
    text = "\n".join(p.advice)
    assert "short" in text
    # Each alternative offered really fits.
    for line in p.advice:
        if line.startswith("Lower quantization"):
            flag = line.split("--quant ")[1].split()[0]
            q = Quantization.parse(flag)
            alt = plan(R1_4BIT.with_quantization(q), p.nodes, context=8192)
            assert alt.fits
    more = [a for a in p.advice if a.startswith("More nodes")]
    for i, line in enumerate(more):
        k = int(line.split()[2])
        extra = lambda k: list(p.nodes) + parse_node_arg(f"m4-max:128x{k}", start_index=9)  # noqa: E731
        alt = plan(R1_4BIT, extra(k), context=8192)
        assert alt.fits
        if line.endswith("at the current limits."):
            assert alt.verdict == "fits"
        if i == 0 and k > 1:  # the fewest nodes that fit at all
            assert not plan(R1_4BIT, extra(k - 1), context=8192).fits
    assert any(a.startswith("Lower quantization") for a in p.advice)
    assert any(a.startswith("More nodes") for a in p.advice)


def test_shorter_context_and_fewer_sessions_are_offered_when_they_fit():
    spec = toy_spec([GiB] * 4, kv_per_token=16 * 1024)  # 2 GiB of KV per session at 32k
    nodes = [node("a", 4, bw=400), node("b", 4, bw=400)]
    p = plan(spec, nodes, context=32768, sessions=2, prompt_cache_tokens=0)
    assert p.verdict == "does-not-fit"
    ctx = [a for a in p.advice if a.startswith("Shorter context")]
    ses = [a for a in p.advice if a.startswith("Fewer sessions")]
    assert ctx and ses
    c = int(ctx[0].split("--context ")[1])
    assert plan(spec, nodes, context=c, sessions=2, prompt_cache_tokens=0).fits
    assert not plan(spec, nodes, context=c + 1, sessions=2, prompt_cache_tokens=0).fits


def test_raising_the_wired_limit_is_advised_exactly_and_never_beyond_safe():
    spec = toy_spec([GiB] * 12)
    nodes = [node("mac", 10, bw=400, macos=True, total_gib=32, reserve=0)]
    p = plan(spec, nodes, context=1)
    check_plan(p)
    assert p.verdict == "fits-with-wired-limit"
    (name, cmd), = p.wired_limit_commands
    assert name == "mac" and cmd.startswith("sudo sysctl iogpu.wired_limit_mb=")
    mb = int(cmd.rsplit("=", 1)[1])
    assert mb * MiB <= safe_max_wired_bytes(32 * GiB)
    assert any(cmd in a for a in p.advice)
    # The same node on Linux has no wired limit to raise.
    linux = [node("linux", 10, bw=400, macos=False, total_gib=32, reserve=0)]
    assert plan(spec, linux, context=1).verdict == "does-not-fit"


def test_same_input_same_plan_and_reorder_puts_fast_nodes_first():
    nodes = parse_node_arg("m4-pro:64x4") + parse_node_arg("m2-ultra:192x2", start_index=5)
    a, b = plan(R1_4BIT, nodes), plan(R1_4BIT, nodes)
    assert a == b
    r = plan(R1_4BIT, nodes, reorder=True)
    assert r.nodes[0].chip == "M2 Ultra"
    check_plan(r)


def test_r1_over_16_nodes_plans_well_under_a_second():
    nodes = parse_node_arg("m4-pro:64x8") + parse_node_arg("m2-ultra:192x4", start_index=9) \
        + parse_node_arg("m4-max:128x4", start_index=13)
    t = time.perf_counter()
    p = plan(R1_4BIT, nodes)
    assert time.perf_counter() - t < 1.0
    check_plan(p)


# ---------------------------------------------------------------------------------------
# Property-based: random clusters and models.


@st.composite
def models(draw):
    if draw(st.booleans()):
        n = draw(st.integers(1, 8))
        layers = draw(st.lists(st.integers(1, 4 * GiB), min_size=n, max_size=n))
        return toy_spec(layers, draw(st.sampled_from([1.0, 0.1])),
                        draw(st.integers(0, 4096)), draw(st.integers(0, GiB)),
                        draw(st.integers(0, GiB)), draw(st.booleans()))
    cfg = {"model_type": draw(st.sampled_from(["llama", "qwen2", "deepseek_v3"])),
           "hidden_size": 64 * draw(st.integers(1, 8)), "num_hidden_layers": draw(st.integers(1, 8)),
           "intermediate_size": 64 * draw(st.integers(1, 16)), "num_attention_heads": 4,
           "num_key_value_heads": draw(st.sampled_from([1, 2, 4])), "vocab_size": 512,
           "rms_norm_eps": 1e-6, "moe_intermediate_size": 64, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "kv_lora_rank": 64, "q_lora_rank": 64,
           "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
           "tie_word_embeddings": draw(st.booleans())}
    q = draw(st.sampled_from([None, Quantization(4, 64), Quantization(3, 32)]))
    return model_spec_from_config(cfg, q)


def small_models():
    """Models brute force can search: at most 6 layers."""
    return models().map(lambda spec: spec if spec.num_layers <= 6 else
                        toy_spec([l.weight_bytes for l in spec.layers[:6]]))


@st.composite
def clusters(draw, costs, max_nodes=5):
    """1-5 nodes sized around an even share of what the model needs (shares, not raw
    integers: hypothesis favours small integers, which would never fit)."""
    n = draw(st.integers(1, max_nodes))
    total = costs.need(0, costs.n)
    unit = max(total / n, max(costs.need_tab[i][i + 1] for i in range(costs.n)))
    out = []
    for i in range(n):
        usable = int(unit * draw(st.floats(0.5, 2.0)))
        macos = draw(st.booleans())
        out.append(NodeSpec(
            name=f"n{i}", total_bytes=max(usable, 1) + int(total * draw(st.floats(0, 1))),
            usable_bytes=usable, bandwidth_gbs=draw(st.sampled_from([None, 0, 120, 273, 800])),
            macos=macos, reserve_bytes=int(unit * draw(st.floats(0, 0.02))),
            max_wired_bytes=int(usable * draw(st.floats(1, 1.5))) if macos else None))
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_plan_covers_every_layer_once_and_never_exceeds_a_node(data):
    spec = data.draw(models())
    context, sessions = data.draw(st.integers(1, 9000)), data.draw(st.integers(1, 3))
    nodes = data.draw(clusters(StageCosts(spec, context, sessions)))
    p = plan(spec, nodes, context=context, sessions=sessions)
    event(p.verdict)
    if p.fits:
        check_plan(p)
        event(f"{len(p.stages)} stage(s)")
    else:
        assert not p.stages and p.advice


def brute_force(costs, nodes, budgets, hop_s):
    """Every split (contiguous, in node order, nodes may be skipped) and its objective."""
    known = [n.bandwidth for n in nodes if n.bandwidth]
    mbps = [round((n.bandwidth or min(known)) * 1000) if known else None for n in nodes]
    hop = round(hop_s * 1e9)
    L, found = costs.n, []

    def walk(j, s, split):
        if s == L:
            stages = len(split)
            time_ = sum((Fraction(costs.active(a, b) * 1000, mbps[k]) for k, a, b in split),
                        Fraction(0)) + (hop * stages if stages > 1 else 0) if known else 0
            fullness = max(costs.need(a, b) / budgets[k] for k, a, b in split)
            found.append(((time_, fullness), split))
            return
        if j == len(nodes):
            return
        walk(j + 1, s, split)
        for e in range(s + 1, L + 1):
            if budgets[j] > 0 and costs.need(s, e) <= budgets[j]:
                walk(j + 1, e, split + [(j, s, e)])

    walk(0, 0, [])
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_search_is_exact(data):
    spec = data.draw(small_models())
    context = data.draw(st.integers(1, 5000))
    costs = StageCosts(spec, context, 1)
    nodes = data.draw(clusters(costs, max_nodes=4))
    budgets = [budget_bytes(n, n.usable_bytes, 0.05) for n in nodes]
    hop_s = hop_seconds(get_link("tb5"), spec.hidden_size * spec.act_bytes) * 0.5
    every = brute_force(costs, nodes, budgets, hop_s)
    ours = solve(costs, nodes, budgets, hop_s)
    event(f"{len(every)} feasible splits" if len(every) < 3 else "3+ feasible splits")
    if not every:
        assert ours is None
        return
    best = min(v for v, _ in every)
    assert ours is not None
    assert dict((tuple(s), v) for v, s in every)[tuple(ours)] == best


# ---------------------------------------------------------------------------------------
# Module structure: imports go one way.


def _planner_imports():
    """module -> (shard_planner modules it imports at the top, ones it imports in a body)."""
    import ast
    import pathlib

    import shard_planner

    root = pathlib.Path(shard_planner.__file__).parent
    out = {}
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        top, nested = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = ([f"{node.module}.{a.name}" for a in node.names]
                         if node.module == "shard_planner" else [node.module])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            mods = {n.split(".")[1] for n in names if n.startswith("shard_planner.")}
            (top if node in tree.body else nested).update(mods)
        out[path.stem] = (top, nested)
    return out


def test_planner_modules_import_one_way_without_lazy_imports():
    graph = _planner_imports()
    assert {"advice", "planner", "stage_costs", "plans"} <= set(graph)
    assert all(not nested for _, nested in graph.values()), \
        {m: n for m, (_, n) in graph.items() if n}
    # advice and the planner no longer import each other: the shared tables are their own.
    assert "planner" not in graph["advice"][0] and "advice" in graph["planner"][0]
    assert "stage_costs" in graph["advice"][0]
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == "done":
            return
        state[m] = "open"
        for dep in graph[m][0] - {"__init__"}:
            visit(dep, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def test_each_planner_module_imports_alone_without_mlx_or_grpc():
    import subprocess
    import sys

    mods = sorted(f"shard_planner.{m}" for m in _planner_imports() if m != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('shard_planner')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
        "assert not [k for k in sys.modules if k.split('.')[0] in ('mlx', 'grpc', 'numpy')]\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_shard_planner_passes_mypy_strict():
    """The planner stays typed: mypy --strict over the whole package."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          "shard_planner"], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------
# The prompt cache and the MTP module in a stage's need.


def test_prompt_cache_is_counted_in_each_stage_and_can_make_a_plan_not_fit():
    spec = toy_spec([GiB] * 4, kv_per_token=64 * 1024)  # 256 MiB of KV per 4096 tokens
    nodes = [node("a", 3, bw=400), node("b", 3, bw=400)]
    p = plan(spec, nodes, context=4096, prompt_cache_tokens=0)
    assert p.verdict == "fits"
    assert all(s.prompt_cache_bytes == 0 for s in p.stages)
    default = plan(spec, nodes, context=4096)  # one context's worth by default
    assert default.prompt_cache_tokens == 4096
    for s in default.stages:
        assert s.prompt_cache_bytes == spec.kv_bytes(s.start, s.end, 4096) > 0
        assert s.need_bytes == (s.weight_bytes + s.kv_bytes + s.prompt_cache_bytes
                                + s.workspace_bytes + s.reserve_bytes)
        assert s.need_bytes + s.headroom_bytes <= s.usable_bytes
    huge = plan(spec, nodes, context=4096, prompt_cache_tokens=40 * 4096)
    assert huge.verdict == "does-not-fit"
    (line,) = [a for a in huge.advice if a.startswith("Smaller prompt cache")]
    tokens = int(line.rsplit("--prompt-cache ", 1)[1])
    assert plan(spec, nodes, context=4096, prompt_cache_tokens=tokens).fits
    assert not plan(spec, nodes, context=4096, prompt_cache_tokens=tokens + 256).fits
    with pytest.raises(ValueError, match="prompt_cache_tokens"):
        plan(spec, nodes, prompt_cache_tokens=-1)


def test_the_mtp_module_goes_on_the_last_stage_with_its_own_cache():
    nodes = parse_node_arg("m2-ultra:192x3")
    p = plan(R1_4BIT, nodes, context=4096, sessions=2, draft="mtp")
    check_plan(p)
    assert p.draft == "mtp"
    *first, last = p.stages
    assert all(s.mtp_bytes == 0 and s.mtp_kv_bytes == 0 for s in first)
    assert last.mtp_bytes == R1_4BIT.mtp_stage_bytes(last.start) > R1_4BIT.mtp.weight_bytes
    # One layer of MLA KV for the sessions and the prompt cache (1,152 bytes per token).
    assert last.mtp_kv_bytes == 1152 * (2 * 4096 + 4096)
    without = plan(R1_4BIT, nodes, context=4096, sessions=2)
    assert without.draft is None
    assert sum(s.need_bytes for s in p.stages) == sum(
        s.need_bytes for s in without.stages) + last.mtp_bytes + last.mtp_kv_bytes


def test_no_room_for_the_mtp_module_falls_back_to_prompt_lookup():
    base = toy_spec([GiB] * 8)
    mtp_layer = LayerSpec(index=8, kind="dense", weight_bytes=GiB, active_bytes=GiB,
                          params=GiB, active_params=GiB, kv_bytes_per_token=0)
    spec = replace(base, mtp=MtpSpec((mtp_layer,), 0, 0))
    nodes = [node("a", 5, bw=400), node("b", 5, bw=400)]  # 4.75 GiB each after headroom
    p = plan(spec, nodes, context=1, draft="mtp")
    assert p.verdict == "fits" and p.draft == "lookup"
    assert all(s.mtp_bytes == 0 for s in p.stages)
    assert any(a.startswith("no room for the MTP layer on the last stage; drafts fall back to "
                            "prompt lookup") for a in p.advice)
    roomy = plan(spec, [node("a", 6, bw=400), node("b", 6, bw=400)], context=1, draft="mtp")
    assert roomy.draft == "mtp" and roomy.stages[-1].mtp_bytes == GiB
    distill = model_spec_from_config(load_config("deepseek-r1-distill-qwen-14b"), Quantization(4))
    d = plan(distill, parse_node_arg("m2-ultra:192"), draft="mtp")
    assert d.draft == "lookup" and any("no MTP layer" in a for a in d.advice)


# ---------------------------------------------------------------------------------------
# Measured links: the search with a cost per pair of nodes is exact too.


def brute_force_pairs(costs, nodes, budgets, hidden, token):
    known = [n.bandwidth for n in nodes if n.bandwidth]
    mbps = [round((n.bandwidth or min(known)) * 1000) for n in nodes]
    found = []
    for v, split in brute_force(costs, nodes, budgets, 0.0):
        time_ = sum((Fraction(costs.active(a, b) * 1000, mbps[k]) for k, a, b in split),
                    Fraction(0))
        ks = [k for k, _, _ in split]
        if len(ks) > 1:
            time_ += sum(round(hidden[a][b] * 1e9) for a, b in zip(ks, ks[1:]))
            time_ += round(token[ks[-1]][ks[0]] * 1e9)
        found.append(((time_, v[1]), split))
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_search_with_measured_links_is_exact(data):
    spec = data.draw(small_models())
    costs = StageCosts(spec, data.draw(st.integers(1, 5000)), 1)
    nodes = [replace(n, bandwidth_gbs=n.bandwidth or 273) for n in
             data.draw(clusters(costs, max_nodes=4))]
    budgets = [budget_bytes(n, n.usable_bytes, 0.05) for n in nodes]
    ms = st.integers(0, 50).map(lambda x: x * 1e-3)  # whole ms: spread, not all alike
    hidden = [[data.draw(ms) for _ in nodes] for _ in nodes]
    token = [[data.draw(ms) for _ in nodes] for _ in nodes]
    every = brute_force_pairs(costs, nodes, budgets, hidden, token)
    ours = solve_pairs(costs, nodes, budgets, hidden, token)
    event(f"{len({len(s) for _, s in every})} different stage counts")
    if not every:
        assert ours is None
        return
    assert ours is not None
    assert dict((tuple(s), v) for v, s in every)[tuple(ours)] == min(v for v, _ in every)
