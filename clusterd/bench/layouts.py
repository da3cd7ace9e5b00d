"""Cluster layouts: how many nodes, which split, and a loaded ring that runs
generations through the real pipeline (coordinator, daemons, gRPC)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from clusterd.bench.runs import ProcessMemory, RunResult, SubjectInfo
from clusterd.coordinator.cluster import Node, connect, load_ring
from clusterd.coordinator.placement import SplitError, parse_split, plan_ranges, ranges_from_counts
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import GenerationStats, Pipeline, Sampling
from clusterd.models.stage import read_config


@dataclass(frozen=True)
class LayoutSpec:
    nodes: int
    split: tuple[int, ...]  # layers per stage, first stage first; () until planned
    how: str  # "even" | "planned" | "given"

    @property
    def label(self) -> str:
        return f"clusterd {self.nodes} node{'s' if self.nodes > 1 else ''}"


def parse_nodes(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SplitError(f"--nodes {text!r}: give node counts, e.g. 1,2,3") from None
    if not counts or counts[0] < 1:
        raise SplitError(f"--nodes {text!r}: every count must be at least 1")
    return counts


def even_split(num_layers: int, nodes: int) -> list[int]:
    """As equal as possible; the earlier stages take the extra layers, since
    the last stage also runs the final norm, the head and the sampler."""
    if nodes > num_layers:
        raise SplitError(f"{nodes} nodes but the model has only {num_layers} layers")
    base, extra = divmod(num_layers, nodes)
    return [base + (1 if i < extra else 0) for i in range(nodes)]


def layout_specs(node_counts: Sequence[int], split: str, num_layers: int) -> list[LayoutSpec]:
    """One layout per node count. `split` is even, planned (the shard planner
    decides once the nodes are known), or explicit counts (which fix the node
    count too)."""
    if split not in ("even", "planned"):
        counts = parse_split(split, len(split.split(",")), num_layers)
        return [LayoutSpec(len(counts), tuple(counts), "given")]
    if split == "planned":
        return [LayoutSpec(n, (), "planned") for n in node_counts]
    return [LayoutSpec(n, tuple(even_split(num_layers, n)), "even") for n in node_counts]


def _activation_dtype(config: dict):
    # The hidden state has the model's float dtype (synthetic CPU models: float32).
    import mlx.core as mx

    name = str(config.get("torch_dtype", "float32"))
    return {"float16": mx.float16, "bfloat16": mx.bfloat16}.get(name, mx.float32)


class ClusterdLayout:
    """A loaded ring on real daemons; generate() is the real Pipeline."""

    def __init__(self, model_dir: Path, addresses: Sequence[str], spec: LayoutSpec):
        self.spec = spec
        self.model_dir = Path(model_dir)
        config = read_config(self.model_dir)
        self.hidden_size = int(config["hidden_size"])
        self.activation_dtype = _activation_dtype(config)
        self.nodes: list[Node] = connect(list(addresses)[: spec.nodes])
        if spec.how == "planned":
            # The planner may leave nodes out when fewer hold the model: fewer hops.
            ranges = plan_ranges(self.model_dir, self.nodes, None)
            for n, r in zip(self.nodes, ranges):
                if r is None:
                    n.peer.close()
            self.nodes = [n for n, r in zip(self.nodes, ranges) if r is not None]
            split = [e - s for s, e in (r for r in ranges if r is not None)]
        else:
            split = list(spec.split)
        label = spec.label
        if len(split) != spec.nodes:
            label += f" (planner used {len(split)})"
        self.info = SubjectInfo(label, "clusterd", len(split), split, spec.how)
        t0 = time.monotonic()
        self.stages = load_ring(self.model_dir, self.nodes, ranges_from_counts(split))
        self.load_s = time.monotonic() - t0
        self.pipeline: Optional[Pipeline] = None
        self._step_size = -1

    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prefill_step_size: int) -> RunResult:
        if self.pipeline is None or self._step_size != prefill_step_size:
            self.pipeline = Pipeline(self.stages, prefill_step_size=prefill_step_size)
            self._step_size = prefill_step_size
        stats = GenerationStats()
        times: list[float] = []
        t0 = time.monotonic()
        # Greedy and no stop tokens: exactly max_tokens, the same ids as mlx-lm.
        for _ in self.pipeline.generate(list(prompt), max_tokens, Sampling(temperature=0.0),
                                        stop_ids=(), stats=stats):
            times.append(time.monotonic() - t0)
        return RunResult(len(prompt), list(stats.tokens), times)

    def memory(self) -> list[ProcessMemory]:
        return stage_memory(self.stages)

    def close(self) -> None:
        for st in self.stages:
            try:
                st.peer.unload()
            except PeerError:
                pass
        for n in self.nodes:
            n.peer.close()


def stage_memory(stages) -> list[ProcessMemory]:
    """Each stage's process memory as its node reports it (0 when it does not answer)."""
    out = []
    for st in stages:
        try:
            info = st.peer.info()
            out.append(ProcessMemory(info.name or st.peer.address, info.rss_bytes,
                                     info.memory_held_bytes, (st.start, st.end)))
        except PeerError:
            out.append(ProcessMemory(st.peer.name, 0, 0, (st.start, st.end)))
    return out
