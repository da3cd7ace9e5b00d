"""The serving modes of `clusterd bench` end to end on the tiny model: real
daemons, the real engine, the real mlx-lm worker (batched and single
process). Only the shape of the results and their correctness fields are
asserted (teacher-forcing misses 0, tokens equal where they must be), never
a speed."""

import csv
import json
import subprocess
import sys

import pytest
from rich.console import Console

from clusterd.bench.modes import ServingConfig
from clusterd.bench.serving_report import print_result, write_all
from clusterd.local_cluster import LocalCluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "clusterd", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two running daemons the in-process runs use as --peer nodes."""
    with LocalCluster(2, workdir=tmp_path_factory.mktemp("serving-nodes")) as cluster:
        yield cluster.addresses


def _config(model, nodes, **kw) -> ServingConfig:
    return ServingConfig(model=model, nodes=(1, 2), peers=tuple(nodes), repetitions=1, warmup=0,
                         command="test", **kw)


def _written(result, tmp_path, name="r"):
    console = Console(width=200, record=True)
    print_result(result, console)
    paths = write_all(result, tmp_path, name)
    assert [p.suffix for p in paths] == [".json", ".csv", ".png"]
    assert paths[2].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths[0].read_text())["mode"] == result["mode"]
    return list(csv.DictReader(open(paths[1]))), console.export_text()


def test_concurrency_through_the_cli(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    out = _bench(str(model), "--concurrency", "1,2", "--nodes", "1,2", "-r", "1", "--warmup", "0",
                 "--prompt-tokens", "6", "--new-tokens", "5", "--out", str(tmp_path), "--name", "c")
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["command"] == (f"clusterd bench {model} --concurrency 1,2 --nodes 1,2 -r 1 "
                              f"--warmup 0 --prompt-tokens 6 --new-tokens 5 --out {tmp_path} "
                              "--name c")
    assert {"cpu_count", "mlx", "mlx_lm"} <= set(res["machine"]) and res["code"]
    by = {s["name"]: s for s in res["subjects"]}
    assert set(by) == {"clusterd 1 node", "clusterd 2 nodes", "mlx-lm batched, 1 process",
                       "mlx-lm, 1 process"}, res["skipped"]
    for s in by.values():
        assert not s["error"], s
        want = [1] if s["kind"] == "mlx-lm" else [1, 2]
        assert [r["concurrency"] for r in s["rows"]] == want
        for r in s["rows"]:
            c = r["concurrency"]
            assert r["streams"] == c and r["tokens"] == 5 * c  # no stop ids: every token
            assert r["teacher_forced_misses"] == 0, (s["name"], r)
            assert r["cached_tokens"] == 0  # every prompt distinct
            assert r["aggregate_tok_s"]["median"] > 0 and r["per_stream_tok_s"]["median"] > 0
            assert r["ttft_p99_s"] >= r["ttft_s"]["median"] > 0
            assert r["vs_mlx_lm_batched"] > 0 and r["vs_own_c1"] > 0
    for name in ("clusterd 1 node", "clusterd 2 nodes"):
        assert by[name]["tokens_match_mlx_lm"] is True  # one stream alone: mlx-lm's ids
        assert by[name]["split"] in ([6], [3, 3]) and by[name]["memory"]
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert len(rows) == 7 and {r["concurrency"] for r in rows} == {"1", "2"}
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    assert "÷ mlx-lm batched" in out.stdout


def test_interleave_reports_every_phase(tmp_path, synthetic, nodes):
    from clusterd.bench.interleave import run_interleave

    model = synthetic("deepseek_v3", "tiny")
    res = run_interleave(_config(model, nodes, streams=2, long_prompt=40, prompt_tokens=6,
                                 new_tokens=4, prefill_step_size=16), Console(quiet=True))
    names = [s["name"] for s in res["subjects"]]
    assert names == ["clusterd 1 node", "clusterd 2 nodes", "mlx-lm batched, 1 process"]
    assert res["workload"]["nodes"] == "remote --peer"
    for s in res["subjects"]:
        assert not s["error"], s
        for phase in ("before", "during", "after"):
            iv = s["intervals"][phase]
            # Each of the 2 streams decodes 4 tokens before and after (3 intervals
            # each at least); at least one interval of each straddles the prefill.
            assert iv["n"] >= {"before": 6, "during": 2, "after": 6}[phase], (s["name"], phase)
            assert iv["p99_ms"] >= iv["p50_ms"] > 0
        # One scenario per round (mlx-lm runs beside each --peer layout in turn).
        assert s["long_ttft_s"]["median"] > 0
        assert s["tokens_during_prefill"]["n"] == s["long_ttft_s"]["n"] >= 1
        assert s["teacher_forced_misses"] == 0
    rows, text = _written(res, tmp_path)
    assert len(rows) == 3 and "during p50/p99 ms" in text


def test_cache_turns_reuse_the_first_turn(tmp_path, synthetic, nodes):
    from clusterd.bench.cache_turns import run_cache_turns

    model = synthetic("deepseek_v3", "tiny")
    # A pause between the turns: a turn 2 sent the instant turn 1 ends can open
    # before the stages have moved turn 1's caches into their prompt caches.
    res = run_cache_turns(_config(model, nodes, first_turn=40, prompt_tokens=5, new_tokens=3,
                                  turn_gap_s=0.3), Console(quiet=True))
    by = {s["name"]: s for s in res["subjects"]}
    assert set(by) == {f"{who}, cache {c}" for c in ("on", "off")
                       for who in ("clusterd 1 node", "clusterd 2 nodes", "mlx-lm, 1 process")}
    for name, s in by.items():
        assert not s["error"], s
        assert s["turn2_prompt_tokens"] == 40 + 3 + 5
        assert s["turn1_cached_tokens"]["median"] == 0  # a new chat every round
        assert s["teacher_forced_misses"] == 0
        assert s["turn2_ttft_s"]["median"] > 0
    for who in ("clusterd 1 node", "clusterd 2 nodes"):
        on, off = by[f"{who}, cache on"], by[f"{who}, cache off"]
        # The stages hold turn 1's prompt and every answer token fed back (all but the last).
        assert on["turn2_cached_tokens"]["median"] == 40 + 3 - 1
        assert on["turn2_cache_missed_rounds"] == 0
        assert off["turn2_cached_tokens"]["median"] == 0
        assert on["tokens_match_without_cache"] is True
        assert on["turn2_vs_without_cache"] > 0
    assert by["mlx-lm, 1 process, cache on"]["turn2_cached_tokens"]["median"] >= 42
    rows, text = _written(res, tmp_path)
    assert len(rows) == 6 and "turn 2 cached tokens" in text


def test_trip_costs_per_width(tmp_path, synthetic, nodes):
    from clusterd.bench.trips import run_trips

    model = synthetic("deepseek_v3", "tiny")
    res = run_trips(_config(model, nodes, trip_tokens=(1, 2, 3), trips=3, prompt_tokens=8),
                    Console(quiet=True))
    by = {s["name"]: s for s in res["subjects"]}
    assert set(by) == {"clusterd 1 node", "clusterd 2 nodes", "mlx-lm, 1 process"}
    for s in by.values():
        assert not s["error"], s
        assert [r["tokens"] for r in s["rows"]] == [1, 2, 3]
        assert s["rows"][0]["vs_one_token"] == 1.0
        for r in s["rows"]:
            # 3 trips a round; mlx-lm runs beside each --peer layout in turn.
            assert r["trip"]["n"] == (3 if s["kind"] == "clusterd" else 6)
            assert r["trip"]["p50_ms"] > 0 and r["vs_one_token"] > 0
            if s["kind"] == "clusterd":  # each width's token is mlx-lm's argmax there
                assert r["teacher_forced_misses"] == 0
    rows, text = _written(res, tmp_path)
    assert len(rows) == 9 and "÷ 1-token trip" in text


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "1,2", "--trip-tokens", "1,2"], "one serving mode per run"),
    (["--concurrency", "1,2", "--no-hop"], "--no-hop does not apply to --concurrency"),
    (["--interleave-prompt", "64", "--trips", "3"], "--trips does not apply to --interleave-prompt"),
    (["--streams", "2"], "--streams does not apply to the layouts bench"),
    (["--concurrency", "1", "--turn-gap", "1"], "--turn-gap does not apply to --concurrency"),
    (["--concurrency", "0,2"], "--concurrency '0,2': every value must be at least 1"),
    (["--sessions", "4"], "--sessions applies to --predict"),
])
def test_serving_flags_are_checked_before_anything_runs(tmp_path, args, message):
    from click.testing import CliRunner

    from clusterd.cli.bench import bench

    out = CliRunner().invoke(bench, [*args, "--out", str(tmp_path)])
    assert out.exit_code != 0 and message in out.output, out.output
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
