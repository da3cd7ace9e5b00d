"""Wired memory: what a node wires on real Macs (recorded device info), and
that on Linux it does nothing."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import clusterd
from clusterd.models.stage import StageBounds, load_stage
from clusterd.node.wired import (GiB, MetalWiring, WiredMemory, raise_command, stage_need_bytes,
                                 wired_decision)
from mac_recordings import M2_ULTRA_192, M2_ULTRA_192_RAISED, M3_ULTRA_512, M4_PRO_64
from shard_planner.model_spec import model_spec_from_config

R1_CONFIG = {**json.loads((Path(clusterd.__file__).parent / "models/catalog/deepseek-r1.json")
                          .read_text()), "quantization": {"group_size": 32, "bits": 4}}
R1 = model_spec_from_config(R1_CONFIG)


def r1_stage(start, end):
    return SimpleNamespace(bounds=StageBounds(start, end, R1.num_layers), config=R1_CONFIG,
                           weight_bytes=R1.stage_weight_bytes(start, end))


def test_r1_middle_stage_on_a_default_m2_ultra_is_close_to_the_limit():
    """The plan for 3 x M2 Ultra gives one node 20 MoE layers (134 GiB): 93%
    of the 144 GiB Metal keeps wired by default, so the node warns and says
    how to raise the limit."""
    need = stage_need_bytes(r1_stage(22, 42), context=4096, sessions=1)
    assert need == R1.stage_weight_bytes(22, 42) + R1.kv_bytes(22, 42, 4096, 1)
    d = wired_decision(need, M2_ULTRA_192)
    assert d.limit_bytes == need  # everything it holds, below the system limit
    assert 0.9 < d.share < 0.95
    (warning,) = d.warnings
    assert "close to the limit" in warning
    assert "sudo sysctl iogpu.wired_limit_mb=152576" in warning  # 149 GiB: need under 90%
    # After raising the limit as the planner advises: no warning.
    raised = wired_decision(need, M2_ULTRA_192_RAISED)
    assert raised.limit_bytes == need and raised.warnings == ()


def test_a_stage_over_the_limit_is_capped_and_named():
    need = 50 * GiB
    d = wired_decision(need, M4_PRO_64)
    assert d.limit_bytes == M4_PRO_64["max_recommended_working_set_size"]  # mlx refuses more
    (warning,) = d.warnings
    assert "at most 48.0 GiB wired" in warning and "iogpu.wired_limit_mb=57344" in warning
    # 55 GiB cannot be brought under 90% within the safe maximum (56 of 64 GiB).
    (warning,) = wired_decision(55 * GiB, M4_PRO_64).warnings
    assert "sysctl" not in warning and "move layers to other nodes" in warning


def test_all_of_r1_on_one_m3_ultra():
    need = stage_need_bytes(r1_stage(0, R1.num_layers))
    d = wired_decision(need, M3_ULTRA_512)
    assert need > M3_ULTRA_512["max_recommended_working_set_size"]
    assert d.limit_bytes == M3_ULTRA_512["max_recommended_working_set_size"]
    assert raise_command(need, 512 * GiB) in d.warnings[0]


def test_a_small_stage_wires_what_it_holds_without_warning():
    d = wired_decision(10 * GiB, M2_ULTRA_192)
    assert d.limit_bytes == 10 * GiB and d.warnings == ()


def test_no_metal_no_decision():
    assert wired_decision(10 * GiB, {}) is None
    assert wired_decision(0, M2_ULTRA_192) is None


class FakeMetal(MetalWiring):
    def __init__(self, info, available=True):
        self.info, self._available, self.limit, self.calls = info, available, 0, []

    def available(self):
        return self._available

    def device_info(self):
        return dict(self.info)

    def set_limit(self, limit):
        self.calls.append(limit)
        old, self.limit = self.limit, limit
        return old


def test_hold_and_release_restore_the_old_limit():
    metal = FakeMetal(M2_ULTRA_192)
    ran = []
    wired = WiredMemory(lambda fn: ran.append(fn) or fn(), metal)
    a = wired.hold(r1_stage(0, 22))
    b = wired.hold(r1_stage(42, 61), context=8192, sessions=2)  # a new stage replaces it
    assert metal.calls == [a.limit_bytes, b.limit_bytes] and metal.limit == b.limit_bytes
    assert b.need_bytes == R1.stage_weight_bytes(42, 61) + R1.kv_bytes(42, 61, 8192, 2)
    wired.release()
    assert metal.limit == 0  # the limit from before the first hold
    wired.release()  # twice: nothing more
    assert metal.calls == [a.limit_bytes, b.limit_bytes, 0]
    assert len(ran) == 3  # every change on the compute thread


def test_linux_does_nothing(synthetic):
    """The real mlx here has no Metal: holding a real stage changes nothing."""
    stage = load_stage(synthetic("deepseek_v3", "tiny"), 0, 3)
    assert not MetalWiring().available()
    ran = []
    wired = WiredMemory(lambda fn: ran.append(fn) or fn())
    assert wired.hold(stage) is None
    wired.release()
    assert ran == []


def test_a_model_the_planner_does_not_know_wires_its_weights():
    metal = FakeMetal(M2_ULTRA_192)
    stage = SimpleNamespace(bounds=StageBounds(0, 2, 2), config={"model_type": "unknown"},
                            weight_bytes=3 * GiB)
    assert WiredMemory(lambda fn: fn(), metal).hold(stage).limit_bytes == 3 * GiB
    assert metal.calls == [3 * GiB]


def test_metal_unavailable_never_touches_the_limit():
    metal = FakeMetal(M2_ULTRA_192, available=False)
    wired = WiredMemory(lambda fn: fn(), metal)
    assert wired.hold(r1_stage(0, 22)) is None
    assert metal.calls == []


@pytest.mark.parametrize("need_gib", [1, 100, 133.7, 150])
def test_raise_command_is_the_smallest_whole_gib_under_90_percent(need_gib):
    need = int(need_gib * GiB)
    mb = int(raise_command(need, 192 * GiB).rsplit("=", 1)[1])
    assert mb % 1024 == 0
    assert need <= 0.9 * mb * 2**20 and need > 0.9 * (mb - 1024) * 2**20


def test_raise_command_stops_at_the_safe_maximum():
    # 160 GiB would need 178 GiB wired: above 90% of 192 GiB (172.8).
    assert raise_command(160 * GiB, 192 * GiB) is None
    assert raise_command(10 * GiB, 0) is None  # RAM unknown: no advice
