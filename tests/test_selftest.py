"""`clusterd selftest`: one JSON report with the machine, the tokens checked
against mlx-lm in bf16 and float32, a hop and decode speed."""

import json
import subprocess
import sys

import mlx.core as mx


def test_selftest_report(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "clusterd", "selftest", "--max-tokens", "6",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    m = report["machine"]
    assert m["backend"] == "cpu" and m["mlx"] == mx.__version__ and m["mlx_lm"]
    assert m["total_memory_bytes"] > 0 and m["chip"] and m["os"].startswith("Linux")
    assert report["ok"] and [r["dtype"] for r in report["runs"]] == ["bfloat16", "float32"]
    for run in report["runs"]:
        assert run["tokens_match_mlx_lm"] and len(run["tokens"]) == 6
        assert run["decode_tok_s"] > 0 and run["split"] == [3, 3]
        assert run["hop"]["reachable"] and run["hop"]["payload_bytes"] == 7168 * 2
        assert 0 < run["hop"]["rtt_p50_ms"] <= run["hop"]["rtt_p99_ms"]
    # On Linux a node wires nothing and never splits a prefill.
    assert report["node_policies"] == {"r1_stage_22_42_prefill_layers_per_eval_2048": None,
                                       "r1_stage_22_42_wired": None}
    assert "match mlx-lm" in done.stderr
