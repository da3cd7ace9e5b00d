"""From a list of node addresses and a model directory to a loaded ring:
ask each node what it has, split the layers, load every stage in parallel."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.peers import PeerError, PeerHandle
from clusterd.coordinator.pipeline import LoadedStage
from clusterd.wire import clusterd_pb2 as pb


class SplitError(ValueError):
    """A requested split that cannot work; the message says why."""


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
    with ThreadPoolExecutor(len(peers)) as pool:
        infos = list(pool.map(lambda p: p.info(), peers))
    return [Node(p, i) for p, i in zip(peers, infos)]


def parse_split(text: str, num_nodes: int, num_layers: int) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SplitError(f"--split {text!r}: give layer counts per node, e.g. 3,2,1") from None
    if len(counts) != num_nodes:
        raise SplitError(f"--split has {len(counts)} entries but there are {num_nodes} nodes")
    if any(c < 1 for c in counts):
        raise SplitError(f"--split {text}: every node needs at least one layer")
    if sum(counts) != num_layers:
        raise SplitError(f"--split {text} covers {sum(counts)} layers; the model has {num_layers}")
    return counts


def ranges_from_counts(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def load_ring(model_dir: Path, nodes: Sequence[Node], ranges: Sequence[tuple[int, int]],
              on_loaded: Optional[Callable[[Node, pb.LoadShardReply], None]] = None
              ) -> list[LoadedStage]:
    """Load every stage at once; any failure names its node."""
    model_dir = Path(model_dir).resolve()

    def load(i: int) -> LoadedStage:
        start, end = ranges[i]
        reply = nodes[i].peer.load_shard(pb.StageSpec(
            model_path=str(model_dir), start_layer=start, end_layer=end,
            stage_index=i, num_stages=len(nodes)))
        if on_loaded:
            on_loaded(nodes[i], reply)
        return LoadedStage(nodes[i].peer, start, end, reply.shard.weight_bytes)

    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(load, range(len(nodes))))


def plan_ranges(model_dir: Path, nodes: Sequence[Node], split: Optional[str], *,
                context: int = 4096, on_note: Callable[[str], None] = lambda t: None
                ) -> list[tuple[int, int]]:
    """The layer range of each node: forced by --split, else the planner's."""
    from clusterd.models.stage import read_config

    num_layers = int(read_config(Path(model_dir))["num_hidden_layers"])
    if split is not None:
        return ranges_from_counts(parse_split(split, len(nodes), num_layers))
    if len(nodes) > num_layers:
        raise SplitError(f"{len(nodes)} nodes but the model has only {num_layers} layers")
    # Memory-proportional until the planner decides.
    usable = [max(n.info.usable_memory_bytes, 1) for n in nodes]
    total = sum(usable)
    counts = [max(1, round(num_layers * u / total)) for u in usable]
    while sum(counts) > num_layers:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < num_layers:
        counts[counts.index(min(counts))] += 1
    return ranges_from_counts(counts)
