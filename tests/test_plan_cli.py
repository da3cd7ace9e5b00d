"""`clusterd plan` through click, on hypothetical nodes and on live daemons."""

import json

import pytest
from click.testing import CliRunner

from clusterd.cli import main
from clusterd.cli.plan import EXIT_DOES_NOT_FIT, node_spec_from_info
from clusterd.models.catalog import load_config, resolve
from clusterd.wire import clusterd_pb2 as pb
from shard_planner.hardware import GiB, safe_max_wired_bytes
from shard_planner.model_spec import Quantization, model_spec_from_config, model_spec_from_dir


def run(*args):
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)


def run_json(*args):
    result = run(*args, "--json")
    return result, json.loads(result.output)


def test_json_for_three_m2_ultras():
    result, out = run_json("deepseek-r1", "--quant", "4bit", "--node", "m2-ultra:192x3")
    assert result.exit_code == 0
    assert out["verdict"] in ("fits", "fits-with-wired-limit")
    # The published 4-bit conversion (group size 32), counted as mlx-lm lays it out.
    expected = model_spec_from_config(load_config("deepseek-r1"), Quantization(4, 32))
    assert out["total_weight_bytes"] == expected.total_weight_bytes
    assert out["model"]["repo"] == "mlx-community/DeepSeek-R1-4bit"
    layers = [s["layers"] for s in out["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 61
    assert all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
    assert sum(s["weight_bytes"] for s in out["stages"]) == out["total_weight_bytes"]
    for s in out["stages"]:
        assert {"node", "layers", "weight_bytes", "kv_bytes", "usable_bytes"} <= set(s)
        assert s["need_bytes"] + s["headroom_bytes"] <= s["usable_bytes"]
        if s["sysctl"]:
            assert s["sysctl"] == f"sudo sysctl iogpu.wired_limit_mb={s['wired_limit_mb']}"
            assert s["usable_bytes"] <= safe_max_wired_bytes(192 * GiB)
    assert out["predicted"]["decode_tok_s"] > 0 and out["predicted"]["prefill_tok_s"] > 0
    assert isinstance(out["advice"], list)


def test_does_not_fit_exits_3_with_advice():
    result, out = run_json("deepseek-r1", "--node", "m4-pro:64x7")
    assert result.exit_code == EXIT_DOES_NOT_FIT
    assert out["verdict"] == "does-not-fit" and out["stages"] == []
    assert out["shortfall_bytes"] > 0 and any("--quant" in a for a in out["advice"])
    assert out["predicted"]["decode_tok_s"] is None and out["predicted"]["prefill_tok_s"] is None


def test_human_output_has_a_table_a_verdict_and_published_results():
    result = run("deepseek-r1", "--node", "m3-ultra:512", "--context", "8192")
    assert result.exit_code == 0
    text = result.output
    for word in ("layers", "weights", "usable", "verdict:", "predicted: decode",
                 "published on this hardware: llama.cpp"):
        assert word in text
    assert "sudo sysctl iogpu.wired_limit_mb=" in text or "verdict: fits" in text


def test_several_node_kinds_keep_their_order():
    _, out = run_json("deepseek-r1", "--node", "m2-ultra:192x2", "--node", "m4-max:128x2")
    names = [s["node"] for s in out["stages"]]
    order = ["m2-ultra-192#1", "m2-ultra-192#2", "m4-max-128#3", "m4-max-128#4"]
    assert names == [n for n in order if n in names]


@pytest.mark.parametrize("quant,repo,bits,group", [
    ("3bit", "mlx-community/DeepSeek-R1-3bit", 3, 32),
    ("4bit-g64", None, 4, 64),
    ("8bit", None, 8, 64),
])
def test_catalog_quantizations(quant, repo, bits, group):
    r = resolve("deepseek-r1", quant)
    assert r.repo == repo and r.quantization == Quantization(bits, group)
    assert r.verified == (repo is not None)
    _, out = run_json("deepseek-r1", "--quant", quant, "--node", "m3-ultra:512x2")
    assert out["model"]["quantization"] == f"{bits}bit-g{group}"
    assert resolve("mlx-community/DeepSeek-R1-3bit").quantization == Quantization(3, 32)
    assert resolve("deepseek-r1", "bf16").quantization is None


def test_a_model_folder_is_read_from_its_headers(synthetic):
    path = synthetic("llama")
    result, out = run_json(str(path), "--node", "m4:16x2")
    assert result.exit_code == 0 and out["verdict"] == "fits"
    assert out["model"]["source"] == "safetensors"
    assert out["total_weight_bytes"] == model_spec_from_dir(path).total_weight_bytes


def test_bad_input_is_a_clear_error():
    result = run("deepseek-r1", "--node", "m2-ultra:256")
    assert result.exit_code == 2 and "64, 128, 192" in result.output
    result = run("no-such-model", "--node", "m2-ultra:192")
    assert result.exit_code == 1 and "deepseek-r1" in result.output
    result = run("deepseek-r1", "--quant", "7bit", "--node", "m2-ultra:192")
    assert result.exit_code == 1 and "bits" in result.output


def test_node_spec_from_a_mac_and_a_linux_node():
    mac = pb.NodeInfo(name="studio", chip="Apple M2 Ultra", total_memory_bytes=192 * GiB,
                      usable_memory_bytes=144 * GiB, bandwidth_gbs=800, free_disk_bytes=GiB,
                      platform="Darwin arm64")
    spec = node_spec_from_info(mac, "10.0.0.2:50051")
    assert spec.macos and spec.raisable_bytes > spec.usable_bytes and spec.tflops
    assert spec.address == "10.0.0.2:50051" and spec.free_disk_bytes == GiB
    linux = pb.NodeInfo(name="ci", chip="x86_64 cpu", total_memory_bytes=16 * GiB,
                        usable_memory_bytes=10 * GiB, bandwidth_gbs=0, platform="Linux x86_64")
    spec = node_spec_from_info(linux)
    assert not spec.macos and spec.raisable_bytes == spec.usable_bytes
    assert spec.bandwidth is None and spec.tflops is None


@pytest.mark.e2e
def test_plan_against_live_daemons_in_peer_order(three_nodes, synthetic):
    path = synthetic("deepseek_v3")
    peers = list(reversed(three_nodes.addresses))
    args = [str(path)] + [x for a in peers for x in ("--peer", a)]
    result, out = run_json(*args)
    assert result.exit_code == 0, result.output
    assert out["verdict"] == "fits"
    assert [s["address"] for s in out["stages"]] == peers[:len(out["stages"])]
    assert out["objective"] == "memory"  # Linux nodes report no bandwidth


def test_sessions_prompt_cache_and_mtp_drafts_in_the_output(tmp_path):
    args = ("deepseek-r1", "--quant", "4bit", "--node", "m2-ultra:192x3", "--sessions", "8",
            "--prompt-cache", "8192", "--draft", "mtp")
    result, out = run_json(*args)
    assert result.exit_code == 0
    assert out["prompt_cache_tokens"] == 8192 and out["draft"] == "mtp"
    spec = model_spec_from_config(load_config("deepseek-r1"), Quantization(4, 32))
    assert sum(s["prompt_cache_bytes"] for s in out["stages"]) == spec.kv_bytes(0, 61, 8192)
    assert out["stages"][-1]["mtp_bytes"] == spec.mtp_stage_bytes(out["stages"][-1]["layers"][0])
    assert all(s["mtp_bytes"] == 0 for s in out["stages"][:-1])
    serving = out["serving"]
    single = out["predicted"]["decode_tok_s"]
    assert serving["sessions"]["sessions"] == 8
    assert serving["sessions"]["aggregate_tok_s"] > single > serving["sessions"]["per_stream_tok_s"]
    assert serving["mtp"]["per_stream_tok_s"] > single
    assert serving["mtp"]["tokens_per_trip"] == pytest.approx(1.85)
    text = run(*args).output
    for words in ("cache", "+mtp", "MTP module on m2-ultra-192#3", "with MTP drafts: decode",
                  "serving 8 sessions at once:", "tok/s per stream", "prompt cache 8192 tokens"):
        assert words in text, words


def test_two_models_at_once_human_and_json():
    args = ("deepseek-r1", "--quant", "4bit", "--node", "m2-ultra:192x3",
            "--also", "deepseek-r1-distill-qwen-14b")
    result, out = run_json(*args)
    assert result.exit_code == 0
    assert [m["model"]["name"] for m in out["models"]] == ["deepseek-r1",
                                                           "deepseek-r1-distill-qwen-14b"]
    assert [m["role"] for m in out["models"]] == ["main", "also"]
    layout = {ml["model"]: ml["stages"] for ml in out["layout"]}
    assert [s["layers"] for s in layout["deepseek-r1"]][-1] == [42, 61]
    assert [s["layers"] for s in layout["deepseek-r1-distill-qwen-14b"]] == [[0, 48]]
    shared = [n for n in out["nodes"] if len(n["stages"]) == 2]
    assert len(shared) == 1 and shared[0]["free_bytes"] >= 0
    assert shared[0]["sysctl"] in {c["command"] for c in out["wired_limit_commands"]}
    assert out["models"][1]["why"][0].startswith("deepseek-r1-distill-qwen-14b on ")
    text = run(*args).output
    assert "[also] deepseek-r1-distill-qwen-14b" in text and "memory per node" in text
    assert "beside the stages there" in text and "verdict: fits-with-wired-limit" in text
    # Forced onto a node with no room left: does not fit, exit 3, and says so.
    result, out = run_json("deepseek-r1", "--node", "m2-ultra:192x3",
                           "--also", "deepseek-r1-distill-llama-70b@2")
    assert result.exit_code == EXIT_DOES_NOT_FIT and out["verdict"] == "does-not-fit"
    assert out["models"][1]["why"][0].startswith(
        "deepseek-r1-distill-llama-70b does not fit on m2-ultra-192#2")
    result = run("deepseek-r1", "--node", "m2-ultra:192x3", "--also", "deepseek-r1-distill-qwen-14b@x")
    assert result.exit_code == 2 and "no node 'x'" in result.output


def test_measured_links_say_which_figures_were_used(tmp_path):
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"measured_at": "2026-03-01T12:00:00Z", "links": [
        {"from": "m2-ultra-192#1", "to": "m2-ultra-192#2", "rtt_ms": 0.4,
         "throughput_mbps": 18000}]}))
    args = ("deepseek-r1", "--node", "m2-ultra:192x3", "--links", str(path))
    result, out = run_json(*args)
    assert result.exit_code == 0
    assert [(h["from"], h["to"], h["source"]) for h in out["hops"]] == [
        ("m2-ultra-192#1", "m2-ultra-192#2", "measured"),
        ("m2-ultra-192#2", "m2-ultra-192#3", "preset"),
        ("m2-ultra-192#3", "m2-ultra-192#1", "preset")]
    text = run(*args).output
    assert "link m2-ultra-192#1 -> m2-ultra-192#2: measured, 0.4 ms round trip, 18000 Mb/s" in text
    assert ("link preset tb5 (not measured) for m2-ultra-192#2 -> m2-ultra-192#3, "
            "m2-ultra-192#3 -> m2-ultra-192#1") in text
    path.write_text('{"measured_at": "now", "links": [{"from": "a", "to": "b"}]}')
    result = run(*args)
    assert result.exit_code == 2 and "rtt_ms" in result.output
    result = run("deepseek-r1", "--node", "m2-ultra:192x3", "--links", str(tmp_path / "none.json"))
    assert result.exit_code == 2 and "does not exist" in result.output
