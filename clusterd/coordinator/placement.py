"""Where each layer goes: the shard planner's split over the live nodes, or
a split the user forced with --split. One range per node, in ring order;
None for a node the planner leaves out."""

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from shard_planner.hardware import NodeSpec, bandwidth_for_chip_name, find_chip
from shard_planner.model_spec import model_spec_from_dir
from shard_planner.planner import DOES_NOT_FIT, plan


# Links measured by `clusterd doctor` steer the split while they are this
# fresh: cables and Wi-Fi change, and an old measurement misleads.
LINKS_MAX_AGE = timedelta(hours=24)


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


def measured_links(path: Path, names: Sequence[str], now: Optional[datetime] = None):
    """(links between these nodes for plan(links=...), or None; what was used
    and why), from the links file `clusterd doctor` writes."""
    how = "run `clusterd doctor` to measure them"
    if not path.is_file():
        return None, f"no measured links ({how}): every hop costs the planner's link preset"
    from shard_planner.links import load_links

    try:
        m = load_links(path)
        when = datetime.fromisoformat(m.measured_at.replace("Z", "+00:00"))
    except (OSError, ValueError) as e:
        return None, f"ignoring the measured links: {e}; {how} again"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    age = (now or datetime.now(timezone.utc)) - when
    if age > LINKS_MAX_AGE:
        return None, (f"the links in {path} were measured {age.days} day(s) {age.seconds // 3600} "
                      f"h ago, too long to trust ({how} again): every hop costs the preset")
    pairs = {k: v for k, v in m.pairs.items() if k[0] in names and k[1] in names}
    if not pairs:
        return None, f"{path} measures no link between these nodes ({how} with them)"
    used = ", ".join(f"{a}->{b}" for a, b in pairs)
    return pairs, f"the split uses the links clusterd doctor measured at {m.measured_at}: {used}"


def plan_ranges(model_dir: Path, nodes: Sequence[Any], split: Optional[str], *,
                context: int = 4096, prefill_step_size: int = 2048, sessions: int = 1,
                prompt_cache_tokens: Optional[int] = None, draft: Optional[str] = None,
                on_note: Callable[[str], None] = lambda t: None,
                links_file: Optional[Path] = None) -> list[Optional[tuple[int, int]]]:
    """`nodes` have `.info` (NodeInfo) and `.peer.address`. `links_file`: the
    measured links (default <clusterd folder>/links.json)."""
    from clusterd.doctor.links import links_path
    from clusterd.home import clusterd_home

    spec = model_spec_from_dir(model_dir)
    if split is not None:
        return list(ranges_from_counts(parse_split(split, len(nodes), spec.num_layers)))
    specs = [node_spec_from_info(n.info, n.peer.address) for n in nodes]
    links, note = measured_links(links_file or links_path(clusterd_home()),
                                 [s.name for s in specs])
    on_note(note)
    extra = {"links": links} if links else {}  # none measured: the planner's presets
    p = plan(spec, specs, context=context, sessions=sessions, prefill_chunk=prefill_step_size,
             prompt_cache_tokens=prompt_cache_tokens, draft=draft, **extra)
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
