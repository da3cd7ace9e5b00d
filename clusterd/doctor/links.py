"""The measured links file: what `clusterd doctor` measured between ring
neighbours, for `clusterd plan --links` and the default split.

    {"measured_at": ISO time, "links": [{"from": NAME, "to": NAME,
                                         "rtt_ms": float, "throughput_mbps": float}]}

at `<clusterd folder>/links.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

LINKS_FILE = "links.json"


@dataclass(frozen=True)
class MeasuredLink:
    src: str
    dst: str
    rtt_ms: float
    throughput_mbps: float

    def to_json(self) -> dict:
        return {"from": self.src, "to": self.dst, "rtt_ms": round(self.rtt_ms, 4),
                "throughput_mbps": round(self.throughput_mbps, 2)}


def links_path(home: Path) -> Path:
    return Path(home) / LINKS_FILE


def write_links(home: Path, links: Sequence[MeasuredLink], *,
                now: Optional[datetime] = None) -> Path:
    """Atomically, so a reader never sees half a file. Only what was measured
    now: one time stamp must hold for every link in the file."""
    path = links_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    tmp = path.with_name(f".{LINKS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"measured_at": stamp, "links": [l.to_json() for l in links]},
                              indent=2)
                   + "\n")
    os.replace(tmp, path)
    return path


