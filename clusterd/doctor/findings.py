"""What `clusterd doctor` reports: findings, each with its fix, as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

PROBLEM, WARNING, OK, INFO = "problem", "warning", "ok", "info"
_MARK = {PROBLEM: "✗", WARNING: "!", OK: "✓", INFO: "·"}


@dataclass(frozen=True)
class Finding:
    level: str              # problem | warning | ok | info
    check: str              # discovery | reach | secret | clock | tls | protocol | duplicate |
                            # ring | interfaces | memory | disk
    text: str
    fix: str = ""
    nodes: tuple[str, ...] = ()  # the nodes it is about, by name or address

    def line(self) -> str:
        out = f"{_MARK.get(self.level, '?')} {self.text}"
        return out + (f"\n    fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]
    nodes: tuple[dict, ...] = ()
    links: tuple[dict, ...] = ()
    links_file: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == PROBLEM]

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"healthy": self.healthy, "problems": len(self.problems),
                "warnings": sum(f.level == WARNING for f in self.findings),
                "findings": [asdict(f) | {"nodes": list(f.nodes)} for f in self.findings],
                "nodes": list(self.nodes), "links": list(self.links),
                "links_file": self.links_file, **self.extra}

    def text(self) -> str:
        order = {PROBLEM: 0, WARNING: 1, INFO: 2, OK: 3}
        lines = [f.line() for f in sorted(self.findings, key=lambda f: order.get(f.level, 9))]
        n, w = len(self.problems), sum(f.level == WARNING for f in self.findings)
        lines.append("nothing wrong found" if not n and not w else
                     f"{n} problem(s), {w} warning(s)")
        return "\n".join(lines)
