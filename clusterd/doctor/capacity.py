"""Memory and disk for a model on the live nodes: does the current plan fit
their usable memory (and which wired limit to raise), and does each node have
the disk for the files of its layers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from clusterd.doctor.findings import INFO, OK, PROBLEM, WARNING, Finding
from clusterd.doctor.survey import NodeSeen

GiB = 2**30


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan_for(model: str, quant: Optional[str], ring: Sequence[NodeSeen], *, context: int,
             prefill_step_size: int, links: Any = None):
    """(ModelSpec, source facts, Plan) for `model` on the nodes in ring order."""
    # `clusterd plan`'s own reading of MODEL (folder, name or repository), so both agree.
    from clusterd.cli.plan import _model_spec as model_spec_for
    from clusterd.coordinator.placement import node_spec_from_info
    from shard_planner.planner import plan

    spec, source = model_spec_for(model, quant)
    nodes = [node_spec_from_info(n.report.info, n.node.address) for n in ring]
    extra = {"links": links} if links else {}
    return spec, source, plan(spec, nodes, context=context, prefill_chunk=prefill_step_size,
                              **extra)


def memory_findings(label: str, p) -> list[Finding]:
    stages = "; ".join(f"{s.node.name}: layers {s.start}-{s.end}, needs "
                       f"{_gib(s.need_bytes + s.headroom_bytes)} of {_gib(s.usable_bytes)}"
                       for s in p.stages)
    if p.verdict == "fits":
        return [Finding(OK, "memory", f"{label} fits the usable memory ({stages})")]
    if p.verdict == "fits-with-wired-limit":
        fix = "; ".join(f"on {name}: {cmd}" for name, cmd in p.wired_limit_commands)
        return [Finding(WARNING, "memory", f"{label} fits only with a raised GPU wired limit "
                        f"({stages})", fix + " (until the next reboot)",
                        tuple(name for name, _ in p.wired_limit_commands))]
    return [Finding(PROBLEM, "memory", f"{label} does not fit these nodes' usable memory",
                    " ".join(p.advice))]


def disk_findings(spec, source: dict, p, ring: Sequence[NodeSeen]) -> list[Finding]:
    """Each node's free disk against the weight files of its layers, less
    what its store already holds. Only for models fetched into the nodes'
    stores: a folder is read where it is."""
    repo = source.get("repo")
    if not repo:
        return [Finding(INFO, "disk", "the model is a folder every node reads where it is: no "
                        "files to fetch")]
    from clusterd.coordinator.peers import PeerError, PeerHandle

    out = []
    for s in p.stages:
        seen = ring[s.node_index]
        need = spec.stage_weight_bytes(s.start, s.end)
        peer = PeerHandle(seen.node.address)
        try:
            held = sum(f.size for f in peer.list_files(repo) if f.path.endswith(".safetensors"))
        except PeerError:
            held = 0  # nothing of this model in its store yet
        finally:
            peer.close()
        missing = max(0, need - held)
        free = int(seen.report.info.free_disk_bytes or 0)
        if free and missing > free:
            out.append(Finding(PROBLEM, "disk",
                               f"{seen.name} has {_gib(free)} free, but the files of its layers "
                               f"{s.start}-{s.end} take about {_gib(need)} ({_gib(held)} already "
                               "there)", f"free {_gib(missing - free)} on {seen.name}, or give "
                               "it fewer layers (--split)", (seen.name,)))
        else:
            out.append(Finding(OK, "disk", f"{seen.name} has the disk for its files "
                               f"({_gib(missing)} to fetch, {_gib(free)} free)", "", (seen.name,)))
    return out
