"""Several models on the same nodes (R1 with a distill beside a stage of
it): one placement of all of them by the shard planner (plan_many over the
live nodes), each model's stages loaded under its own shard name, a Ring
each. When a ring heals or re-forms, its model is re-planned alone on what
the nodes have left: each node's live Info says which shards it holds, and
what those reserve is taken off its usable memory, so the other model's
stages are never counted twice nor pushed out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import Node, SplitError, connect
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import RingClient
from clusterd.coordinator.placement import measured_links, node_spec_from_info
from clusterd.coordinator.prepare import ModelSource
from clusterd.coordinator.ring import (Confirm, Ring, RingOptions, RingPlacer, fetch_stages,
                                       model_files)
from clusterd.models.stage import read_config
from clusterd.node.shards import Limits, budget
from clusterd.wire import clusterd_pb2 as pb
from shard_planner.model_spec import ModelSpec, model_spec_from_dir
from shard_planner.multi import AlsoModel, MultiPlan, plan_many
from shard_planner.planner import DOES_NOT_FIT


@dataclass(frozen=True)
class Wanted:
    """A model to serve: its name (served, and in the placement), where it
    comes from, and the node it must go on (a name, HOST:PORT or position)."""

    name: str
    source: ModelSource
    node: Optional[str] = None


def reserved_bytes(shard: pb.LoadedShard, spec: Optional[ModelSpec]) -> int:
    """What a node reserves for a shard it holds: the node's own count
    (weights, KV for its sessions, prompt cache, prefill workspace). Without
    the model's spec (a shard someone else loaded) the workspace is unknown
    and left out."""
    limits = Limits.from_wire(shard.limits)
    if spec is not None and shard.end_layer <= spec.num_layers:
        return budget(spec, shard.start_layer, shard.end_layer, limits, shard.weight_bytes).total
    kv = shard.kv_bytes_per_token * limits.context * limits.max_sessions
    return shard.weight_bytes + kv + limits.prompt_cache_bytes


class SharedRoom:
    """The coordinator.ring.Room of models that share nodes: knows each
    model's spec by its shard name, asks every node what it holds now."""

    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = dict(specs)

    def views(self, nodes: list, shard: str) -> list[Node]:
        def view(node: Node) -> Node:
            info = node.peer.info()  # live: what it holds now, not when first met
            others = sum(reserved_bytes(s, self._specs.get(s.shard))
                         for s in info.shards if s.shard != shard)
            seen = pb.NodeInfo()
            seen.CopyFrom(info)
            seen.usable_memory_bytes = max(0, info.usable_memory_bytes - others)
            return Node(node.peer, seen)

        return [view(n) for n in nodes]

    def release(self, views: list, ranges: list, shard: str) -> None:
        for node, r in zip(views, ranges):
            if r is None and any(s.shard == shard for s in node.info.shards):
                try:
                    node.peer.unload(shard)
                except PeerError:
                    pass  # gone or busy: its memory counts as held until it is back


def forced_nodes(wanted: Sequence[Wanted], nodes: Sequence[Node]) -> list[Optional[str]]:
    """Each model's NODE (a node name, HOST:PORT, or its 1-based position in
    the ring) as plan_many names it; an unknown one is a SplitError listing
    the nodes."""
    names = [n.info.name for n in nodes]
    out: list[Optional[str]] = []
    for w in wanted:
        if w.node is None:
            out.append(None)
            continue
        at = [i for i, n in enumerate(nodes) if w.node in (n.info.name, n.peer.address)]
        if not at and w.node.isdigit() and 1 <= int(w.node) <= len(nodes):
            at = [int(w.node) - 1]
        if not at:
            listed = ", ".join(f"{n.info.name} ({n.peer.address})" for n in nodes)
            raise SplitError(f"--also {w.name}@{w.node}: no node {w.node!r} among the nodes "
                             f"({listed}); give one of them, or --also-peer HOST:PORT for "
                             "nodes of its own")
        i = at[0]
        out.append(names[i] if names.count(names[i]) == 1 else str(i + 1))
    return out


def shared_plan(specs: Sequence[ModelSpec], nodes: Sequence[Node],
                forced: Sequence[Optional[str]], opts: RingOptions,
                say: Callable[[str], None]) -> MultiPlan:
    """The first spec placed as alone, the others where there is room (or
    forced); a SplitError with the planner's advice when one fits nowhere."""
    from clusterd.doctor.links import links_path
    from clusterd.home import clusterd_home

    node_specs = [node_spec_from_info(n.info, n.peer.address) for n in nodes]
    links, note = measured_links(links_path(clusterd_home()), [s.name for s in node_specs])
    say(note)
    extra = {"links": links} if links else {}
    also = [AlsoModel(s, node=f) for s, f in zip(specs[1:], forced[1:])]
    try:
        mp = plan_many(specs[0], node_specs, also, opts.context, opts.sessions,
                       prefill_chunk=opts.prefill_step_size,
                       prompt_cache_tokens=opts.cache_tokens, **extra)
    except ValueError as e:
        raise SplitError(str(e)) from None
    main, *others = mp.models
    if main.plan.verdict == DOES_NOT_FIT:
        raise SplitError("the model does not fit these nodes. " + " ".join(main.plan.advice))
    for pl in others:
        if pl.plan.verdict == DOES_NOT_FIT:
            raise SplitError(f"{pl.name} cannot be served beside {main.name}; nothing was "
                             f"loaded. {' '.join(pl.why)} (--also-peer HOST:PORT gives it "
                             "nodes of its own.)")
    return mp


def placement_lines(mp: MultiPlan) -> list[str]:
    """Which model on which node, its layers, and why it went there."""
    out = [f"placement of {len(mp.models)} models on {len(mp.nodes)} nodes (the shard planner):"]
    for pl in mp.models:
        where = ", ".join(f"{mp.nodes[st.node_index].name} layers [{st.start}, {st.end})"
                          for st in pl.plan.stages)
        out.append(f"  {pl.name}: {where}")
        out += [f"    {line.strip()}" for line in pl.why]
    return out + list(mp.advice)


def ranges_of(mp: MultiPlan, i: int) -> list[Optional[tuple[int, int]]]:
    ranges: list[Optional[tuple[int, int]]] = [None] * len(mp.nodes)
    for st in mp.models[i].plan.stages:
        ranges[st.node_index] = (st.start, st.end)
    return ranges


def open_rings(wanted: Sequence[Wanted], addresses: Sequence[str], opts: RingOptions,
               say: Callable[[str], None], confirm: Confirm = lambda text: False,
               rediscover: Optional[Callable[[], Sequence[str]]] = None) -> list[Ring]:
    """The first of `wanted` as the main model, the rest beside it, all on
    the nodes at `addresses`; one Ring each, in order. The placement is
    decided (and printed) before anything is loaded. Raises one of
    coordinator.ring.OPEN_ERRORS with a message for the user."""
    nodes = connect(addresses)
    files = [model_files(w.source, nodes, opts, say) for w in wanted]
    specs = [model_spec_from_dir(meta, name=w.name) for w, (meta, _, _) in zip(wanted, files)]
    mp = shared_plan(specs, nodes, forced_nodes(wanted, nodes), opts, say)
    for line in placement_lines(mp):
        say(line)
    # The name load_ring gives a shard by default: `run` and `serve` then
    # share what a node holds already (no reload).
    shards = [model_id or Path(meta).resolve().name for meta, model_id, _ in files]
    room = SharedRoom(dict(zip(shards, specs)))
    again = rediscover or (lambda: list(addresses))
    rings: list[Ring] = []
    try:
        # One model after the other: a node loads one shard at a time.
        for i, (w, (meta, model_id, cluster_files)) in enumerate(zip(wanted, files)):
            ranges = ranges_of(mp, i)
            fetch_stages(cluster_files, meta, ranges, opts, say, confirm)
            placer = RingPlacer(w.source, opts, say, confirm, again, list(nodes),
                                shard=shards[i], room=room)
            stages = placer.load(meta, model_id, nodes, ranges)
            rings.append(Ring(RingClient(stages), Chat(meta), read_config(meta), meta, placer,
                              opts))
    except BaseException:
        for r in rings:
            r.client.close()
        raise
    return rings
