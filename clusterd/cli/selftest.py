"""`clusterd selftest`: evidence from this machine, in one JSON report to attach
to a bug report: the synthetic model on the local backend (Metal on a Mac) in
bf16 and float32, 4-bit, through local daemons, its tokens checked against
single-process mlx-lm, one hop and decode tok/s measured, what the node would
wire and how it would split a long prefill, and the machine described."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import click

PROMPT = [(i * 37 + 11) % 1500 + 2 for i in range(24)]
CHUNK = 8  # several prefill chunks, so the chunked schedule is exercised too
R1_HOP_BYTES = 7168 * 2


def _say(text: str) -> None:
    click.echo(text, err=True)


def machine_facts() -> dict:
    from clusterd.bench.stats import machine, now_iso
    from clusterd.models.watchdog import current_backend
    from clusterd.node.resources import probe

    facts = machine()
    r = probe()
    backend = current_backend()
    facts.update(date=now_iso(), chip=r.chip, total_memory_bytes=r.total_bytes,
                 usable_memory_bytes=r.usable_bytes, bandwidth_gbs=r.bandwidth_gbs,
                 platform=r.platform, backend="metal" if backend.metal else "cpu",
                 device_info=dict(backend.device_info))
    return facts


def node_policies() -> dict:
    """What a node on this machine would do with R1: the wired limit for a
    20-layer 4-bit stage and the layers per evaluation of a 2048-token chunk."""
    from types import SimpleNamespace

    from clusterd.models import catalog
    from clusterd.models.stage import StageBounds
    from clusterd.models.watchdog import current_backend, prefill_policy
    from clusterd.node.wired import stage_need_bytes, wired_decision
    from shard_planner.model_spec import model_spec_from_config

    config = {**catalog.resolve("deepseek-r1", "4bit").config,
              "quantization": {"group_size": 32, "bits": 4}}
    backend = current_backend()
    policy = prefill_policy(config, 22, 42, backend, env={})
    stage = SimpleNamespace(bounds=StageBounds(22, 42, 61), config=config,
                            weight_bytes=model_spec_from_config(config).stage_weight_bytes(22, 42))
    decision = wired_decision(stage_need_bytes(stage), backend.device_info)
    return {
        "r1_stage_22_42_prefill_layers_per_eval_2048": policy.layers_per_eval(2048, 0),
        "r1_stage_22_42_wired": None if decision is None else {
            "limit_bytes": decision.limit_bytes, "need_bytes": decision.need_bytes,
            "recommended_bytes": decision.recommended_bytes,
            "warnings": list(decision.warnings)},
    }


def run_case(dtype: str, preset: str, nodes: int, max_tokens: int, workdir: Path) -> dict:
    from clusterd.coordinator.cluster import connect, load_ring, ranges_from_counts
    from clusterd.coordinator.pipeline import GenerationStats, Pipeline, Sampling
    from clusterd.local_cluster import LocalCluster
    from clusterd.models.stage import read_config
    from clusterd.models.synthetic import build_synthetic_model
    from clusterd.reference import mlx_lm_greedy
    from clusterd.wire import clusterd_pb2 as pb
    from clusterd.wire import clusterd_pb2_grpc as rpc
    from clusterd.wire.channel import open_channel

    model = build_synthetic_model("deepseek_v3", preset, dtype=dtype)
    config = read_config(model)
    layers = config["num_hidden_layers"]
    counts = [layers // nodes + (i < layers % nodes) for i in range(nodes)]
    stats = GenerationStats()
    hop: Optional[dict] = None
    with LocalCluster(nodes, workdir=workdir / dtype, prefix=f"selftest-{dtype[:4]}") as cluster:
        ring = connect(cluster.addresses)
        try:
            stages = load_ring(model, ring, ranges_from_counts(counts))
            tokens = list(Pipeline(stages, prefill_step_size=CHUNK).generate(
                PROMPT, max_tokens, Sampling(temperature=0.0), stop_ids=(), stats=stats))
            if nodes > 1:  # one decode hop, node to node: R1's hidden state in bf16
                width = R1_HOP_BYTES
                channel = open_channel(cluster.addresses[0])
                reply = rpc.NodeStub(channel).Probe(pb.ProbeRequest(
                    address=cluster.addresses[1], payload_bytes=width, rounds=50,
                    timeout_seconds=30), timeout=40)
                channel.close()
                hop = {"payload_bytes": width, "reachable": reply.reachable,
                       "rtt_p50_ms": reply.rtt_p50_ms, "rtt_p99_ms": reply.rtt_p99_ms,
                       "error": reply.error}
        finally:
            for n in ring:
                n.peer.close()
    expected = mlx_lm_greedy(model, PROMPT, max_tokens, CHUNK)
    return {"dtype": dtype, "model": model.name, "layers": layers, "split": counts,
            "prompt_tokens": len(PROMPT), "tokens": tokens, "tokens_match_mlx_lm":
            tokens == expected, **({} if tokens == expected else {"mlx_lm_tokens": expected}),
            "ttft_s": stats.ttft_s, "decode_tok_s": stats.decode_tok_s, "hop": hop}


@click.command()
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 4),
              help="Local daemons the model is split over.")
@click.option("--preset", default="tiny", show_default=True,
              type=click.Choice(["tiny", "small", "bench"]), help="Synthetic model size.")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["bfloat16", "float32"]),
              help="Activation dtype (repeatable) [default: both].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON report here [default: stdout].")
def selftest(nodes, preset, max_tokens, dtypes, out):
    """Produce evidence from this machine for a bug report: the synthetic
    model through local daemons on this backend (Metal on a Mac) in bf16 and
    float32 at 4 bits, checked token for token against mlx-lm, with hop and
    decode speed and the machine's description, as one JSON report. Exit
    status 1 when any tokens differ from mlx-lm."""
    report = {"machine": machine_facts(), "node_policies": node_policies(), "runs": []}
    _say(f"{report['machine']['chip']}, {report['machine']['backend']}, "
         f"mlx {report['machine']['mlx']}")
    with tempfile.TemporaryDirectory(prefix="clusterd-selftest-") as tmp:
        for dtype in dtypes or ("bfloat16", "float32"):
            _say(f"{dtype}: {preset} model over {nodes} daemon(s), {max_tokens} tokens")
            run = run_case(dtype, preset, nodes, max_tokens, Path(tmp))
            report["runs"].append(run)
            hop = run["hop"]
            _say(f"  tokens {'match' if run['tokens_match_mlx_lm'] else 'DIFFER from'} mlx-lm; "
                 f"decode {run['decode_tok_s']:.1f} tok/s"
                 + (f"; hop {hop['rtt_p50_ms']:.2f} ms" if hop and hop["reachable"] else ""))
    report["ok"] = all(r["tokens_match_mlx_lm"] for r in report["runs"])
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
        _say(f"wrote {out}: attach it to the bug report")
    else:
        click.echo(text)
    sys.exit(0 if report["ok"] else 1)
