"""`clusterd bench` end to end on the tiny model: real daemons, real mlx-lm
baselines; only the shape of the results is asserted, never a speed."""

import csv
import json
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args, timeout=240):
    out = subprocess.run([sys.executable, "-m", "clusterd", "bench", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_bench_writes_every_layout_with_ratios(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    stdout = _bench(str(model), "--nodes", "1,2", "-r", "1", "--warmup", "0",
                    "--prompt-tokens", "4", "--new-tokens", "4",
                    "--no-hop", "--out", str(tmp_path), "--name", "t")
    result = json.loads((tmp_path / "t.json").read_text())
    names = [s["name"] for s in result["subjects"]]
    assert names[0] == "mlx-lm, 1 process"
    assert {"clusterd 1 node", "clusterd 2 nodes", "mlx-lm ring, 2 processes"} <= set(names), \
        (names, result["skipped"])
    for s in result["subjects"]:
        assert not s["error"], s
        for key in ("decode_vs_mlx_lm", "ttft_vs_mlx_lm", "prefill_vs_mlx_lm"):
            assert s[key] > 0, (s["name"], key)
        assert s["decode_tok_s"]["median"] > 0 and s["ttft_s"]["n"] == 1
        assert s["memory"] and all(m["rss_bytes"] > 0 for m in s["memory"])
        assert s["tokens_match_mlx_lm"] is True, s["name"]  # greedy: the same ids everywhere
    two = next(s for s in result["subjects"] if s["name"] == "clusterd 2 nodes")
    assert two["split"] == [3, 3] and two["hop_in_pipeline"]["n"] > 0
    assert result["command"].startswith("clusterd bench ")
    assert {"cpu_count", "ram_bytes", "os", "mlx"} <= set(result["machine"])
    assert result["code"]["executor_sha256"]
    assert result["date"]
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["name"] for r in rows] == names
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
    assert "clusterd 2 nodes" in stdout and "decode" in stdout


def test_bench_rejects_a_split_that_does_not_cover_the_model(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    out = subprocess.run([sys.executable, "-m", "clusterd", "bench", str(model), "--split", "1,1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "covers 2 layers; the model has 6" in out.stderr


def test_predict_lists_layouts_links_and_published_results(tmp_path):
    stdout = _bench("--predict", "--sessions", "4", "--out", str(tmp_path), "--name", "p",
                    timeout=60)
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["sessions"] == 4 and "4 sessions" in stdout
    assert any(r.get("sessions") == 4 and r["aggregate_tok_s"] > 0 for r in res["layouts"])
    layouts = {r["layout"] for r in res["layouts"]}
    assert {"3 x M2 Ultra 192 GB", "8 x M4 Pro 64 GB Mac mini", "2 x M3 Ultra 512 GB"} <= layouts
    links = {r["link"] for r in res["layouts"] if r["layout"] == "3 x M2 Ultra 192 GB"}
    assert {"tb5", "10gbe", "wifi"} <= links
    three = next(r for r in res["layouts"] if r["layout"] == "3 x M2 Ultra 192 GB"
                 and r["link"] == "tb5")
    assert three["decode_tok_s"] > 0 and len(three["stages"]) >= 1
    systems = {a["system"] for a in res["anchors"]}
    assert any(s.startswith("exo v0") for s in systems) and "llama.cpp" in systems
    assert "5.37" in stdout and "exo v0" in stdout  # the published figures are printed


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("bfloat16", 2)])
def test_hop_report_puts_tcp_next_to_the_rpc(tmp_path, dtype, width):
    from clusterd.bench.hop import measure_hop

    hop = measure_hop(tmp_path, rounds=1, count=5, decode_tokens=4, pace_s=0.001, dtype=dtype)
    assert hop["payload_bytes"] == 7168 * width and hop["dtype"] == dtype
    for key in ("tcp_round_trip", "pipeline_hop"):
        assert hop[key]["n"] > 0 and hop[key]["p50_ms"] == hop[key]["p50_ms"]  # not nan
    assert hop["pipeline_hop_over_tcp_p50"] is not None
    assert set(hop["plain_transports"]) >= {"tcp_one_way", "grpc_stream_one_way"}
