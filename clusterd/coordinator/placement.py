"""Where each layer goes: the shard planner's split over the live nodes, or
a split the user forced with --split. One range per node, in ring order;
None for a node the planner leaves out."""

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from shard_planner.hardware import NodeSpec, bandwidth_for_chip_name, find_chip
from shard_planner.model_spec import model_spec_from_dir
from shard_planner.planner import DOES_NOT_FIT, plan


class SplitError(ValueError):
    """A split that cannot work; the message says why."""


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


def node_spec_from_info(info: Any, address: Optional[str] = None) -> NodeSpec:
    """A live node's NodeInfo (protobuf, or any object with its field names) -> NodeSpec."""
    chip = str(getattr(info, "chip", "") or "") or None
    total = int(getattr(info, "total_memory_bytes", 0))
    bandwidth = float(getattr(info, "bandwidth_gbs", 0.0) or 0.0) or None
    if bandwidth is None and chip:
        bandwidth = bandwidth_for_chip_name(chip, total or None)
    catalog_chip = find_chip(chip or "")
    disk = int(getattr(info, "free_disk_bytes", 0) or 0)
    name = str(getattr(info, "name", "") or getattr(info, "node_id", "") or address or "node")
    return NodeSpec(
        name=name, total_bytes=max(total, 1),
        usable_bytes=int(getattr(info, "usable_memory_bytes", 0)), bandwidth_gbs=bandwidth,
        free_disk_bytes=disk or None, chip=chip,
        tflops=catalog_chip.tflops if catalog_chip else None,
        # Only macOS has a GPU wired limit to raise; elsewhere usable is what is free.
        macos=str(getattr(info, "platform", "")).startswith("Darwin"),
        address=address,
    )


def plan_ranges(model_dir: Path, nodes: Sequence[Any], split: Optional[str], *,
                context: int = 4096, prefill_step_size: int = 2048, sessions: int = 1,
                on_note: Callable[[str], None] = lambda t: None
                ) -> list[Optional[tuple[int, int]]]:
    """`nodes` have `.info` (NodeInfo) and `.peer.address`."""
    spec = model_spec_from_dir(model_dir)
    if split is not None:
        return list(ranges_from_counts(parse_split(split, len(nodes), spec.num_layers)))
    p = plan(spec, [node_spec_from_info(n.info, n.peer.address) for n in nodes],
             context=context, sessions=sessions, prefill_chunk=prefill_step_size)
    if p.verdict == DOES_NOT_FIT:
        raise SplitError("the model does not fit these nodes. " + " ".join(p.advice))
    if p.left_out:
        on_note(f"the planner leaves out {', '.join(p.left_out)}: the model fits without "
                "them, and every extra stage adds a hop")
    if p.verdict != "fits":
        for text in p.advice:
            on_note(text)
    ranges: list[Optional[tuple[int, int]]] = [None] * len(nodes)
    for st in p.stages:
        ranges[st.node_index] = (st.start, st.end)
    return ranges
