"""From a list of node addresses and a model directory to a loaded ring:
ask each node what it has, split the layers, load every stage in parallel."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.discovery import distinct_nodes, node_from_info, parse_peer
from clusterd.coordinator.pipeline import LoadedStage
from clusterd.coordinator.placement import (  # noqa: F401  (the split lives there)
    SplitError, parse_split, plan_ranges, ranges_from_counts)
from clusterd.wire import clusterd_pb2 as pb
from shard_planner.model_spec import model_spec_from_dir


@dataclass(frozen=True)
class Node:
    peer: PeerHandle
    info: pb.NodeInfo


def connect(addresses: Sequence[str], interceptors=()) -> list[Node]:
    if not addresses:
        raise PeerError("", "no nodes given: start `clusterd up` on each Mac and pass --peer HOST:PORT")
    if len(set(addresses)) != len(addresses):
        raise PeerError("", f"a node is listed twice: {list(addresses)}")
    peers = [PeerHandle(a, interceptors) for a in addresses]
    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            infos = list(pool.map(lambda p: p.info(), peers))
        # The rule every command follows: two processes with one node id are
        # used by none; one process given under two addresses is one node.
        problem = distinct_nodes([node_from_info(i, *parse_peer(p.address))
                                  for p, i in zip(peers, infos)])
        if problem:
            raise PeerError("", problem)
    except BaseException:
        for p in peers:
            p.close()
        raise
    return [Node(p, i) for p, i in zip(peers, infos)]


def connect_reachable(addresses: Sequence[str]) -> list[Node]:
    """The nodes among `addresses` that answer now (re-forming a ring)."""
    def one(a: str) -> Optional[Node]:
        peer = PeerHandle(a)
        try:
            return Node(peer, peer.info())
        except PeerError:
            peer.close()
            return None

    if not addresses:
        return []
    with ThreadPoolExecutor(len(addresses)) as pool:
        return [n for n in pool.map(one, list(dict.fromkeys(addresses))) if n is not None]


def load_ring(model_dir: Optional[Path], nodes: Sequence[Node],
              ranges: Sequence[Optional[tuple[int, int]]],
              on_loaded: Optional[Callable[[Node, pb.LoadShardReply], None]] = None,
              *, model_id: str = "", limits: Optional[pb.ShardLimits] = None,
              shard: str = "", prompt_cache_tokens: int = 0,
              mtp: Optional[pb.MtpSpec] = None) -> list[LoadedStage]:
    """Load every stage at once (a node whose range is None takes no part);
    any failure names its node. With model_id (a repository id) each node
    loads from its own model store, else every node reads model_dir.
    `limits` (context, sessions, prefill step) come from the plan and every
    node enforces them, with room for `prompt_cache_tokens` of finished
    sessions' caches; `shard` names the model on the nodes
    (two models on one node need two names). `mtp`: the last stage loads the
    model's MTP layer to draft with (or says why not, and drafts by lookup)."""
    model_path = "" if model_id else str(Path(model_dir).resolve())
    assignments = [(n, r) for n, r in zip(nodes, ranges) if r is not None]
    name = shard or model_id or Path(model_path).name
    spec = model_spec_from_dir(model_dir) if prompt_cache_tokens and model_dir else None

    def load(i: int) -> LoadedStage:
        node, (start, end) = assignments[i]
        lim = pb.ShardLimits()
        if limits is not None:
            lim.CopyFrom(limits)
        lim.ring_stages = len(assignments)
        if spec is not None:  # the prompt cache's room, in this stage's bytes
            lim.prompt_cache_bytes = spec.kv_bytes(start, end, prompt_cache_tokens)
        reply = node.peer.load_shard(pb.StageSpec(
            model_path=model_path, model_id=model_id, start_layer=start, end_layer=end,
            stage_index=i, num_stages=len(assignments), shard=name, limits=lim,
            mtp=mtp if mtp is not None and i == len(assignments) - 1 else None))
        if on_loaded:
            on_loaded(node, reply)
        return LoadedStage(node.peer, start, end, reply.shard.weight_bytes, reply.shard.shard,
                           reply.shard.drafts, reply.shard.drafts_note)

    with ThreadPoolExecutor(len(assignments)) as pool:
        return list(pool.map(load, range(len(assignments))))

