"""`clusterd doctor`: check the cluster as a person debugging it would (who
sees whom, over which interface, who reaches whom, the secret, the clocks,
TLS, versions, duplicate ids, memory and disk for a model) and say how to fix
what is wrong. `survey` gathers, `network`/`ring`/`capacity` judge, and the
links measured between ring neighbours go to the links file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from clusterd.doctor.findings import INFO, OK, PROBLEM, WARNING, Finding, Report
from clusterd.doctor.links import LINKS_FILE, MeasuredLink, links_path, write_links

__all__ = ["Finding", "Report", "run_doctor", "LINKS_FILE", "MeasuredLink", "links_path",
           "write_links", "PROBLEM", "WARNING", "OK", "INFO"]


def _node_json(n) -> dict:
    r = n.report
    return {"name": n.node.name, "address": n.node.address, "node_id": n.node.node_id,
            "boot_id": n.node.boot, "source": n.node.source, "addresses": list(n.node.addresses),
            "status": r.status, "error": r.error, "clock_offset_s": n.clock_offset_s,
            "local_address": n.local_address, "local_interface": n.local_interface,
            "serves_tls": n.serves_tls, "advertises_tls": n.node.tls}


def run_doctor(*, model: Optional[str] = None, quant: Optional[str] = None,
               peers: Sequence[str] = (), interfaces: Optional[Sequence[str]] = None,
               mdns: bool = True, browse_timeout: float = 2.0, context: int = 4096,
               prefill_step_size: int = 2048, rounds: int = 20,
               home: Optional[Path] = None) -> Report:
    """Everything `clusterd doctor` checks. `home`: where the links file goes
    (None: not written)."""
    from clusterd.doctor.capacity import disk_findings, memory_findings, plan_for
    from clusterd.doctor.network import network_findings
    from clusterd.doctor.ring import measured_links, probe_ring, ring_findings, ring_order
    from clusterd.doctor.survey import survey

    s = survey(peers=peers, interfaces=interfaces, mdns=mdns, browse_timeout=browse_timeout)
    findings = network_findings(s)
    ring = ring_order(s.nodes, s.peers)
    hops = probe_ring(ring, rounds=rounds)
    findings += ring_findings(hops)
    if len(hops) > 1 and all(h.ok for h in hops):
        findings.append(Finding(OK, "ring", f"every node reaches the next in the ring "
                                f"({' -> '.join(n.name for n in ring)} -> {ring[0].name})"))
    links = measured_links(hops)
    path = write_links(home, links) if links and home is not None else None
    extra = {}
    if model:
        if not ring:
            findings.append(Finding(PROBLEM, "memory", f"no usable node to plan {model} on",
                                    "fix the problems above first"))
        else:
            try:
                spec, source, p = plan_for(model, quant, ring, context=context,
                                           prefill_step_size=prefill_step_size)
            except Exception as e:  # a catalog or config problem, said as such
                findings.append(Finding(PROBLEM, "memory", f"cannot plan {model}: {e}",
                                        "see `clusterd models` for the names and quantizations"))
            else:
                label = f"{spec.name} {spec.quant_label}"
                findings += memory_findings(label, p)
                if p.stages:
                    findings += disk_findings(spec, source, p, ring)
                extra["plan"] = {"verdict": p.verdict, "stages": [
                    {"node": st.node.name, "layers": [st.start, st.end], "sysctl": st.sysctl}
                    for st in p.stages]}
    return Report(tuple(findings), tuple(_node_json(n) for n in s.nodes),
                  tuple(link.to_json() for link in links), str(path) if path else None, extra)
