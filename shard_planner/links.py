"""Measured links between nodes, and the link each hop of a ring uses.

`clusterd doctor` measures the round trip and throughput between ring neighbours and writes
them as JSON:

    {"measured_at": "2026-03-01T12:00:00Z",
     "links": [{"from": "studio-1", "to": "studio-2", "rtt_ms": 0.42, "throughput_mbps": 9400.0}]}

``rtt_ms`` is the round trip of a small message on the link (the planner takes half of it as
the one-way latency and adds its own per-hop software overhead, as for the presets);
``throughput_mbps`` is megabits per second of a bulk transfer from ``from`` to ``to``. A hop
from node A to node B uses the (A, B) measurement, else the (B, A) one (a round trip is the
same both ways), else the link preset.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from shard_planner.costs import LinkSpec

__all__ = ["Hop", "LinkMeasurements", "PairLinks", "links_document", "load_links",
           "measured_link", "parse_links", "ring_hops"]

PairLinks = Mapping[tuple[str, str], LinkSpec]

MEASURED = "measured"
REVERSE = "measured (reverse direction)"
PRESET = "preset"


@dataclass(frozen=True)
class Hop:
    """One hop of a ring: from the node of stage i to the node of stage i+1 (for the last
    stage: back to the first, carrying the sampled token)."""

    src: str
    dst: str
    link: LinkSpec
    source: str  # "measured", "measured (reverse direction)" or "preset"


@dataclass(frozen=True)
class LinkMeasurements:
    measured_at: str
    pairs: PairLinks  # (from node name, to node name) -> LinkSpec


def measured_link(src: str, dst: str, rtt_ms: float, throughput_mbps: float,
                  measured_at: str = "") -> LinkSpec:
    """A measured round trip and throughput as the LinkSpec the cost model takes."""
    when = f" at {measured_at}" if measured_at else ""
    return LinkSpec(f"measured {src}->{dst}", rtt_ms / 2e3, throughput_mbps / 1e3,
                    f"measured{when}: round trip {rtt_ms:g} ms, {throughput_mbps:g} Mb/s")


def hop_link(links: PairLinks, src: str, dst: str, preset: LinkSpec) -> Hop:
    if (src, dst) in links:
        return Hop(src, dst, links[(src, dst)], MEASURED)
    if (dst, src) in links:
        return Hop(src, dst, links[(dst, src)], REVERSE)
    return Hop(src, dst, preset, PRESET)


def ring_hops(names: Sequence[str], links: PairLinks, preset: LinkSpec) -> tuple[Hop, ...]:
    """The hops of a ring whose stages run on ``names`` in order; none for one stage."""
    if len(names) < 2:
        return ()
    return tuple(hop_link(links, a, names[(i + 1) % len(names)], preset)
                 for i, a in enumerate(names))


def _number(row: Mapping[str, Any], key: str, where: str) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key!r} must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {key!r} must be a positive number, not {value!r}")
    return float(value)


def parse_links(data: Any, source: str = "links file") -> LinkMeasurements:
    """The links document (see the module docstring) -> measurements; a clear ValueError
    naming the entry for anything malformed."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object with 'measured_at' and 'links'")
    measured_at = data.get("measured_at")
    if not isinstance(measured_at, str) or not measured_at:
        raise ValueError(f"{source}: 'measured_at' must be an ISO time string")
    rows = data.get("links")
    if not isinstance(rows, list):
        raise ValueError(f"{source}: 'links' must be a list of {{from, to, rtt_ms, "
                         "throughput_mbps}} objects")
    pairs: dict[tuple[str, str], LinkSpec] = {}
    for i, row in enumerate(rows):
        where = f"{source}: links[{i}]"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where} must be an object")
        src, dst = row.get("from"), row.get("to")
        if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
            raise ValueError(f"{where}: 'from' and 'to' must be node names")
        if src == dst:
            raise ValueError(f"{where}: a link from {src!r} to itself")
        if (src, dst) in pairs:
            raise ValueError(f"{where}: {src} -> {dst} is measured twice")
        pairs[(src, dst)] = measured_link(src, dst, _number(row, "rtt_ms", where),
                                          _number(row, "throughput_mbps", where), measured_at)
    return LinkMeasurements(measured_at, MappingProxyType(pairs))


def load_links(path: str | Path) -> LinkMeasurements:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"links file {p} does not exist") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    return parse_links(data, str(p))


def links_document(rows: Iterable[tuple[str, str, float, float]],
                   measured_at: str) -> dict[str, Any]:
    """(from, to, rtt_ms, throughput_mbps) rows -> the document load_links reads."""
    doc = {"measured_at": measured_at,
           "links": [{"from": a, "to": b, "rtt_ms": rtt, "throughput_mbps": mbps}
                     for a, b, rtt, mbps in rows]}
    parse_links(doc, "links document")  # what is written must read back
    return doc
