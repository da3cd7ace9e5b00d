"""Predicted decode and prefill speed of a plan, and the published results to compare with.

Decode (one stream): one token reads every stage's active bytes once and each cached token
of its KV, at the node's memory bandwidth times an efficiency (or computes, when that takes
longer: serving.py's step model), and crosses one hop per stage boundary plus one back to
the first stage. Prefill: chunks of 2048 tokens flow through the stages as a pipeline; a
stage's time for a chunk is the larger of its compute (at a share of the GPU's FP32 peak)
and its weight reads. Many sessions at once and drafts: serving.predict_serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shard_planner.costs import (
    DECODE_EFFICIENCY,
    DEFAULT_STACK_OVERHEAD_S,
    PREFILL_EFFICIENCY,
    LinkSpec,
    get_link,
    hop_seconds,
)
from shard_planner.hardware import NodeSpec, find_chip, hypothetical_node
from shard_planner.model_spec import ModelSpec
from shard_planner.planner import Plan, StagePlan, plan
from shard_planner.serving import (
    DECODE_COMPUTE_EFFICIENCY,
    hop_links,
    node_tflops,
    ring_hop_seconds,
    stage_rates,
    trip_seconds,
)

__all__ = ["ANCHORS", "Anchor", "Prediction", "StagePrediction", "anchor_comparison", "fmt_rate",
           "matching_anchors", "simulate"]


@dataclass(frozen=True)
class StagePrediction:
    node: str
    decode_ms: float | None  # one decode step of this stage
    prefill_chunk_ms: float | None  # one full chunk at the end of the prompt


@dataclass(frozen=True)
class Prediction:
    decode_tok_s: float | None
    prefill_tok_s: float | None
    decode_ms: float | None  # per token: stage steps + hops
    hop_ms: float  # per token, all hops
    hops: int
    prompt_tokens: int
    stages: tuple[StagePrediction, ...]
    link: str
    efficiency: float
    prefill_efficiency: float
    assumptions: tuple[str, ...] = ()


def _prefill_stage_s(spec: ModelSpec, st: StagePlan, bw: float, tflops: float, c: int, p0: int,
                     eff: float, peff: float) -> float:
    """Seconds for stage ``st`` to run a chunk of ``c`` tokens starting at position ``p0``."""
    flops = 0
    nbytes = 0
    pairs = c * p0 + c * (c + 1) // 2  # causal (query, key) pairs in this chunk
    for layer in spec.layers[st.start:st.end]:
        flops += 2 * layer.active_params * c + layer.flops_per_pair * pairs
        flops += layer.flops_per_key * (p0 + c)
        # A chunk of 2048 tokens touches nearly every routed expert at least once.
        nbytes += min(layer.weight_bytes, layer.active_bytes * c)
    if st.end == spec.num_layers:
        flops += 2 * c * spec.vocab_size * spec.hidden_size
        nbytes += spec.head_bytes
    return max(flops / (tflops * 1e12 * peff), nbytes / (bw * 1e9 * eff))


def _link_label(p: Plan, link: str | LinkSpec | None) -> str:
    if link is not None:
        return get_link(link).name
    measured = sum(1 for h in p.hops if h.source != "preset")
    if not measured:
        return p.link.name
    return f"measured links ({measured} of {len(p.hops)}; {p.link.name} for the rest)"


def simulate(p: Plan, link: str | LinkSpec | None = None, *,
             efficiency: float = DECODE_EFFICIENCY, prefill_efficiency: float = PREFILL_EFFICIENCY,
             prompt_tokens: int | None = None,
             stack_overhead_s: float = DEFAULT_STACK_OVERHEAD_S) -> Prediction:
    """Predict ``p``'s decode and prefill tokens/s. Prompt: the plan's context, at most 8192;
    decode is predicted right after it (the KV cache holds the prompt). ``link`` replaces
    every hop's link (default: the plan's, measured where measured)."""
    lk = get_link(link) if link is not None else p.link
    spec = p.model
    prompt = prompt_tokens or min(p.context, 8192)
    label = _link_label(p, link)
    notes = [f"memory bandwidth at {efficiency:.0%} efficiency", f"link {lk.name}: {lk.source}",
             f"{stack_overhead_s * 1e6:.0f} us software overhead per hop (assumed)"]
    notes += [f"hop {h.src} -> {h.dst}: {h.link.source}" for h in p.hops
              if link is None and h.source != "preset"]
    if not p.stages:
        return Prediction(None, None, None, 0.0, 0, prompt, (), label, efficiency,
                          prefill_efficiency, tuple(notes))
    links = hop_links(p, link)
    hidden_bytes = spec.hidden_size * spec.act_bytes
    n = len(p.stages)
    rates = stage_rates(p, efficiency, DECODE_COMPUTE_EFFICIENCY)
    mem: list[float | None] = [None] * n
    decode_s = None
    hop_s = ring_hop_seconds(spec, links, 1, stack_overhead_s)
    if rates is not None:
        busy, decode_s = trip_seconds(p, rates, links, 1, 1, prompt, 0, stack_overhead_s)
        mem = list(busy)
    # Prefill as a pipeline: finish[i] is when stage i is done with the current chunk.
    tfl = [node_tflops(s.node) for s in p.stages]
    bws = [r[0] / (1e9 * efficiency) for r in rates] if rates else [None] * n
    prefill_s: float | None = None
    last_chunk: list[float | None] = [None] * n
    if all(tfl) and rates is not None:
        finish = [0.0] * n
        step = p.prefill_chunk
        chunk_hops = [hop_seconds(x, min(step, prompt) * hidden_bytes, stack_overhead_s)
                      for x in links]
        for p0 in range(0, prompt, step):
            c = min(step, prompt - p0)
            ready = 0.0
            for i, st in enumerate(p.stages):
                t = _prefill_stage_s(spec, st, bws[i] or 0.0, tfl[i] or 0.0, c, p0, efficiency,
                                     prefill_efficiency)
                finish[i] = max(finish[i], ready) + t
                ready = finish[i] + (chunk_hops[i] if i + 1 < n else 0.0)
                last_chunk[i] = t
        prefill_s = finish[-1]
    else:
        notes.append("prefill not predicted: a node's GPU throughput is unknown")
    stages = tuple(
        StagePrediction(s.node.name, m * 1000 if m is not None else None,
                        lc * 1000 if lc is not None else None)
        for s, m, lc in zip(p.stages, mem, last_chunk)
    )
    return Prediction(
        decode_tok_s=1 / decode_s if decode_s else None,
        prefill_tok_s=prompt / prefill_s if prefill_s else None,
        decode_ms=decode_s * 1000 if decode_s else None, hop_ms=hop_s * 1000,
        hops=n if n > 1 else 0, prompt_tokens=prompt, stages=stages, link=label,
        efficiency=efficiency, prefill_efficiency=prefill_efficiency, assumptions=tuple(notes),
    )


# ---------------------------------------------------------------------------------------
# Published results (the README, "Predicted speed, next to published results")


@dataclass(frozen=True)
class Anchor:
    system: str
    hardware: str
    nodes: tuple[tuple[str, int, int], ...]  # (chip, RAM GB, count); empty: not in the catalog
    model: str
    decode: str  # as published
    other: str
    source: str
    link: str = "tb5"  # preset used for our prediction
    prompt_tokens: int | None = None
    caveat: str = ""
    # Context our plan reserves: benchmarks like these use short prompts.
    context: int = 2048


ANCHORS: tuple[Anchor, ...] = (
    Anchor("exo v0 (gRPC ring, pipeline)", "8 x M4 Pro 64 GB Mac mini", (("m4-pro", 64, 8),),
           "DeepSeek-V3 671B 4-bit", "5.37", "TTFT 2.91 s", "blog.exolabs.net/day-2",
           caveat="V3 has R1's architecture; predicted with R1's config"),
    Anchor("exo v1 (MLX JACCL, RDMA TB5, tensor parallel)", "1 x M3 Ultra",
           (("m3-ultra", 512, 1),), "DeepSeek-V3.1 671B", "21.1", "llama.cpp TCP: 14.8",
           "exo docs/benchmarks (Geerling charts)", link="tb5-rdma",
           caveat="the RAM of those Macs is not stated; 512 GB assumed"),
    Anchor("exo v1 (MLX JACCL, RDMA TB5, tensor parallel)", "2 x M3 Ultra",
           (("m3-ultra", 512, 2),), "DeepSeek-V3.1 671B", "27.8", "llama.cpp TCP: 16.0",
           "exo docs/benchmarks (Geerling charts)", link="tb5-rdma",
           caveat="tensor parallel; a pipeline cannot beat one node for one stream"),
    Anchor("exo v1 (MLX JACCL, RDMA TB5, tensor parallel)", "4 x M3 Ultra",
           (("m3-ultra", 512, 4),), "DeepSeek-V3.1 671B", "32.5", "llama.cpp TCP: 14.6",
           "exo docs/benchmarks (Geerling charts)", link="tb5-rdma",
           caveat="tensor parallel; a pipeline cannot beat one node for one stream"),
    Anchor("llama.cpp", "1 x M3 Ultra 512 GB", (("m3-ultra", 512, 1),),
           "DeepSeek-R1 Q4_K_M (376.65 GiB)", "20.21", "prefill 168.9 tok/s",
           "geerlingguy/beowulf-ai-cluster #17", caveat="GGUF Q4_K_M, not MLX 4-bit"),
    Anchor("mlx-lm (single)", "1 x M3 Ultra 512 GB", (("m3-ultra", 512, 1),),
           "DeepSeek-R1 4-bit", "6.4 to 17-18", "prefill 59.6 tok/s on 13k tokens",
           "forum and press reports", prompt_tokens=13000, context=13312,
           caveat="our efficiencies are calibrated on this row"),
    Anchor("exo v0", "4 x 192 GB Mac Studio over TB", (("m2-ultra", 192, 4),),
           "DeepSeek-R1 4-bit", "0.2", "connection timeouts", "exo issue #755", link="tb4"),
    Anchor("distributed-llama", "M1 MBP + i7 MBP over TB", (), "Llama-3-8B", "4.59",
           "79 ms compute + 139 ms transfer per token", "distributed-llama PR #136",
           caveat="an Intel Mac is not in the chip catalog"),
    Anchor("prima.cpp", "4 home devices on Wi-Fi", (), "Llama-3-70B", "1.48 (674 ms/token)",
           "llama.cpp 10.1 s/token", "prima.cpp README",
           caveat="mixed non-Mac devices are not in the chip catalog"),
)


def _anchor_nodes(a: Anchor) -> list[NodeSpec]:
    out: list[NodeSpec] = []
    for chip, ram, count in a.nodes:
        first = hypothetical_node(chip, ram)
        out += [replace(first, name=f"{first.name}#{len(out) + i + 1}") for i in range(count)]
    return out


def matching_anchors(nodes: list[NodeSpec] | tuple[NodeSpec, ...]) -> list[Anchor]:
    """Published results on the same chips, RAM and node count as ``nodes``."""
    have: dict[tuple[str, int], int] = {}
    for n in nodes:
        chip = find_chip(n.chip or "")
        if chip is None:
            return []
        key = (chip.key, round(n.total_bytes / 2**30))
        have[key] = have.get(key, 0) + 1
    return [a for a in ANCHORS
            if a.nodes and {(c, r): k for c, r, k in a.nodes} == have]


def anchor_comparison(spec: ModelSpec) -> list[tuple[Anchor, Plan | None, Prediction | None]]:
    """Our plan and prediction for each published result whose hardware we can model."""
    rows: list[tuple[Anchor, Plan | None, Prediction | None]] = []
    for a in ANCHORS:
        if not a.nodes:
            rows.append((a, None, None))
            continue
        pl = plan(spec, _anchor_nodes(a), context=a.context, link=a.link, advise=False)
        pred = simulate(pl, prompt_tokens=a.prompt_tokens) if pl.stages else None
        rows.append((a, pl, pred))
    return rows


def fmt_rate(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"
