"""Metal-safe prefill: the layers-per-eval policy on recorded Macs, and that
evaluating per layer (forced on the CPU, the same code path) changes no
output."""

import dataclasses
import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

import clusterd
from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
from clusterd.coordinator.pipeline import Pipeline, Sampling
from clusterd.home import clusterd_home
from clusterd.local_cluster import start_node
from clusterd.models.stage import load_stage
from clusterd.models.watchdog import (FORCE_ENV, WATCHDOG_BUDGET_S, Backend, current_backend,
                                      prefill_policy)
from clusterd.security import SECRET_ENV, load_secret
from mac_recordings import M2_ULTRA_192, M3_ULTRA_512, M4_PRO_64
from reference import mlx_lm_greedy

R1_CONFIG = {**json.loads((Path(clusterd.__file__).parent / "models/catalog/deepseek-r1.json")
                          .read_text()), "quantization": {"group_size": 32, "bits": 4}}
NO_ENV: dict = {}


def metal(info):
    return Backend(True, info)


def test_an_r1_stage_is_split_on_every_mac():
    """20 R1 layers and a 2048-token chunk: several seconds of GPU work as one
    command buffer, so each Mac evaluates every few layers, and each piece
    stays within the budget."""
    ks = {}
    for name, info in {"m4-pro": M4_PRO_64, "m2-ultra": M2_ULTRA_192,
                       "m3-ultra": M3_ULTRA_512}.items():
        p = prefill_policy(R1_CONFIG, 22, 42, metal(info), NO_ENV)
        worst = max(p.layer_seconds(l, 2048, 0) for l in p.layers)
        assert worst * len(p.layers) > 2.0  # unsplit, past the ~2-5 s watchdog
        k = p.layers_per_eval(2048, 0)
        assert 1 <= k < len(p.layers)
        assert k == 1 or k * worst <= WATCHDOG_BUDGET_S
        ks[name] = k
        # Later chunks attend to more keys: never fewer evaluations.
        assert p.layers_per_eval(2048, 30000) <= k
    assert ks["m4-pro"] <= ks["m2-ultra"] <= ks["m3-ultra"]  # slower GPUs, shorter pieces


def test_decode_steps_stay_one_graph():
    for info in (M4_PRO_64, M2_ULTRA_192, M3_ULTRA_512):
        assert prefill_policy(R1_CONFIG, 0, 61, metal(info), NO_ENV).layers_per_eval(1, 4000) is None


def test_a_short_stage_needs_no_split(synthetic):
    from clusterd.models.stage import read_config

    config = read_config(synthetic("deepseek_v3", "tiny"))
    p = prefill_policy(config, 0, 6, metal(M4_PRO_64), NO_ENV)
    assert p.layers_per_eval(2048, 0) is None


def test_unknown_chip_evaluates_every_layer():
    info = {**M2_ULTRA_192, "device_name": "Apple M9 Hyper"}
    assert prefill_policy(R1_CONFIG, 0, 20, metal(info), NO_ENV).layers_per_eval(512) == 1


def test_a_model_the_planner_does_not_know_evaluates_every_layer():
    p = prefill_policy({"model_type": "unknown"}, 0, 4, metal(M2_ULTRA_192), NO_ENV)
    assert p.layers_per_eval(512) == 1 and p.layers_per_eval(1) is None


def test_cpu_backend_does_nothing_unless_forced():
    cpu = Backend(False, {})
    assert prefill_policy(R1_CONFIG, 0, 20, cpu, NO_ENV).layers_per_eval(2048) is None
    forced = prefill_policy(R1_CONFIG, 0, 20, cpu, {FORCE_ENV: "3"})
    assert forced.layers_per_eval(2048) == 3 and forced.layers_per_eval(1) is None
    with pytest.raises(ValueError, match=FORCE_ENV):
        prefill_policy(R1_CONFIG, 0, 20, cpu, {FORCE_ENV: "zero"})
    with pytest.raises(ValueError, match="at least 1"):
        prefill_policy(R1_CONFIG, 0, 20, cpu, {FORCE_ENV: "0"})
    assert not current_backend().metal  # this machine: Linux, CPU


def test_evaluating_per_layer_changes_no_bits(synthetic):
    stage = load_stage(synthetic("deepseek_v3", "tiny"), 0, 6)
    assert stage.prefill_evals.layers_per_eval(40) is None  # CPU: one graph
    tokens = mx.array([[(i * 37 + 11) % 1500 + 2 for i in range(40)]], dtype=mx.int32)
    plain = stage.forward(tokens, stage.make_cache())
    stage.prefill_evals = dataclasses.replace(stage.prefill_evals, forced=1)
    split = stage.forward(tokens, stage.make_cache())
    assert mx.array_equal(plain, split).item()


def test_daemons_evaluating_per_layer_equal_mlx_lm(synthetic, tmp_path):
    """The node's real code path with the eval forced every layer: tokens
    equal single-process mlx-lm on a multi-chunk prompt."""
    model = synthetic("deepseek_v3", "tiny")
    env = {FORCE_ENV: "1", SECRET_ENV: load_secret(clusterd_home(), create=True)}
    nodes = [start_node(tmp_path, f"wd{i}", env=env) for i in range(2)]
    try:
        ring = connect([n.address for n in nodes])
        stages = load_ring(model, ring, ranges_from_counts([3, 3]))
        prompt = [(i * 37 + 11) % 1500 + 2 for i in range(40)]
        tokens = list(Pipeline(stages, prefill_step_size=16).generate(
            prompt, 24, Sampling(temperature=0.0), stop_ids=[1]))
        for n in ring:
            n.peer.close()
    finally:
        for n in nodes:
            n.stop()
    assert tokens == mlx_lm_greedy(model, prompt, 24, 16, stop_ids=(1,))
    assert os.environ.get(FORCE_ENV) is None  # only the daemons had it
