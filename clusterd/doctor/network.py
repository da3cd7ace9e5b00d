"""Judging a survey: discovery, reachability, the secret, clocks, TLS,
protocol versions and duplicate ids. Pure: a Survey in, findings out."""

from __future__ import annotations

import re
from typing import Optional

from clusterd.doctor.findings import INFO, OK, PROBLEM, WARNING, Finding
from clusterd.doctor.survey import NodeSeen, Survey

CLOCK_WARN_S = 30.0  # within the proof window, but a clock that drifts this far will leave it
SET_TIME = ("turn on 'Set time automatically' in System Settings > General > Date & Time "
            "(or run `sudo sntp -sS time.apple.com`)")


def skew_from(error: str) -> Optional[float]:
    """The clock difference a node gave when it refused an expired proof."""
    if "expired" not in error:
        return None
    m = re.search(r"differ by (\d+(?:\.\d+)?) s", error)
    return float(m.group(1)) if m else None


def _names(nodes) -> str:
    return ", ".join(n.name for n in nodes) or "none"


def _tls_mismatch(n: NodeSeen, survey: Survey) -> bool:
    return n.serves_tls is not None and n.serves_tls != survey.client_tls


def discovery_findings(s: Survey) -> list[Finding]:
    out = []
    for note in s.result.notes:
        if "mDNS could not run" in note:
            out.append(Finding(PROBLEM, "discovery", note,
                               "check that this Mac has a network interface up; meanwhile "
                               "pass --peer HOST:PORT"))
        elif "counted once" in note:
            out.append(Finding(INFO, "discovery", note))
    if not s.nodes:
        out.append(Finding(PROBLEM, "discovery", "no nodes found" + (
            " by mDNS" if s.mdns and not s.peers else ""),
            "start `clusterd up` on each Mac; if this network blocks multicast (many Wi-Fi "
            "access points do), pass --peer HOST:PORT"))
        return out
    for n in s.nodes:
        if s.mdns and n.node.source == "peer" and n.report.info is not None:
            out.append(Finding(
                PROBLEM, "discovery",
                f"mDNS does not show {n.label}, but --peer reaches it: multicast does not get "
                "from it to this Mac (Wi-Fi access points often drop it), or it advertises on "
                "another interface",
                f"join the Macs by Ethernet or Thunderbolt Bridge, or start it with `clusterd up "
                f"--interface <its address on this network>`; until then pass --peer "
                f"{n.node.address} to every command", (n.name,)))
        elif n.node.source == "mdns":
            where = ", ".join(f"{a} (via {s.interface_of(a) or 'no interface of this Mac'})"
                              for a in n.node.addresses)
            out.append(Finding(INFO, "discovery", f"mDNS shows {n.name} at {where}", "",
                               (n.name,)))
    for n in s.nodes:
        if n.local_interface and " Wi-Fi " in f" {n.local_interface} ":
            out.append(Finding(
                WARNING, "interfaces", f"this Mac reaches {n.label} over {n.local_interface}: "
                "access points often drop multicast, and every hop waits on the radio",
                "join the Macs by Ethernet or Thunderbolt Bridge, then start `clusterd up "
                "--interface <that interface>` on each", (n.name,)))
    ours = [f"{name} {addr}" for name, addr, _ in s.interfaces if not addr.startswith("127.")]
    if len(ours) > 1:
        reached = "; ".join(f"{n.name} over {n.local_interface}" for n in s.nodes
                            if n.local_interface)
        out.append(Finding(INFO, "interfaces", f"this Mac has several interfaces ({', '.join(ours)})"
                           + (f"; {reached}" if reached else ""),
                           "to keep cluster traffic on one of them, give `--interface NAME` to "
                           "`clusterd up` on every Mac"))
    return out


def reach_findings(s: Survey) -> list[Finding]:
    out = []
    for n in s.nodes:
        r = n.report
        if r.status not in ("unreachable", "failed") or _tls_mismatch(n, s):
            continue
        port = n.node.port
        out.append(Finding(PROBLEM, "reach", r.error or f"cannot reach {n.label}",
                           f"check that `clusterd up` runs on {n.name}, that its firewall lets "
                           f"connections to port {port} in (System Settings > Network > "
                           "Firewall: allow incoming connections for python/clusterd), and that "
                           "both Macs are on the same network", (n.name,)))
    return out


def secret_findings(s: Survey) -> list[Finding]:
    refused = [n for n in s.nodes if n.report.status == "refused"]
    missing = [n for n in refused if "missing on this side" in (n.report.error or "")]
    expired = [n for n in refused if skew_from(n.report.error or "") is not None]
    wrong = [n for n in refused if n not in missing and n not in expired]
    agree = [n for n in s.nodes if n.report.info is not None]
    fp = f" ({s.secret_fingerprint})" if s.secret_fingerprint else ""
    out = []
    if missing:
        source = agree[0].name if agree else "a Mac of the cluster"
        out.append(Finding(PROBLEM, "secret", "this Mac has no cluster secret, so every node "
                           f"refuses it: {_names(missing)}",
                           f"`ssh {source} clusterd secret | clusterd secret --set -` (or set "
                           "CLUSTERD_SECRET)", tuple(n.name for n in missing)))
    if wrong:
        if agree:
            verb = "refuses" if len(wrong) == 1 else "refuse"
            text = (f"cluster secret wrong: {_names(wrong)} {verb} this Mac's secret{fp}; it "
                    f"agrees with {_names(agree)}")
            fix = "; ".join(f"`clusterd secret | ssh {n.node.host} clusterd secret --set -`, then "
                            f"restart `clusterd up` on {n.name}" for n in wrong)
        else:
            text = (f"cluster secret wrong: every node refuses this Mac's secret{fp} "
                    f"({_names(wrong)})")
            fix = (f"copy the cluster's secret to this Mac: `ssh {wrong[0].node.host} clusterd "
                   "secret | clusterd secret --set -`")
        out.append(Finding(PROBLEM, "secret", text, fix, tuple(n.name for n in wrong)))
    if agree and not wrong and not missing:
        out.append(Finding(OK, "secret", f"every node that answered agrees on the cluster "
                           f"secret{fp}"))
    return out


def clock_findings(s: Survey) -> list[Finding]:
    out = []
    expired = [(n, skew_from(n.report.error or "")) for n in s.nodes]
    expired = [(n, skew) for n, skew in expired if skew is not None]
    fine = [n for n in s.nodes if n.report.info is not None]
    for n, skew in expired:
        whose = n.name if fine or len(s.nodes) == 1 else "this Mac"
        out.append(Finding(
            PROBLEM, "clock",
            f"{n.name}'s clock and this Mac's differ by {skew:.0f} s, more than the "
            f"{s.window_s:.0f} s a request's proof is valid: {n.name} refuses every call",
            f"on {whose}: {SET_TIME}", (n.name,)))
    for n in fine:
        if n.clock_offset_s is not None and abs(n.clock_offset_s) > CLOCK_WARN_S:
            out.append(Finding(
                WARNING, "clock", f"{n.name}'s clock is {n.clock_offset_s:+.0f} s off this "
                f"Mac's (calls fail past {s.window_s:.0f} s)", f"on {n.name}: {SET_TIME}",
                (n.name,)))
    if fine and not expired and all(n.clock_offset_s is None or abs(n.clock_offset_s) <= CLOCK_WARN_S
                                    for n in fine):
        out.append(Finding(OK, "clock", "the clocks agree"))
    return out


def tls_findings(s: Survey) -> list[Finding]:
    out = []
    tls = [n for n in s.nodes if n.serves_tls]
    plain = [n for n in s.nodes if n.serves_tls is False]
    if tls and plain:
        out.append(Finding(PROBLEM, "tls", f"TLS on some nodes and not others: TLS on "
                           f"{_names(tls)}, plaintext on {_names(plain)}; they cannot call "
                           "each other",
                           "one setting for the whole cluster: copy ~/.clusterd/tls to every "
                           "Mac (or remove it from every one), then restart `clusterd up`",
                           tuple(n.name for n in tls + plain)))
    for n in s.nodes:
        if not _tls_mismatch(n, s):
            continue
        if n.serves_tls:
            out.append(Finding(PROBLEM, "tls", f"{n.label} serves TLS, but this Mac calls "
                               "without it (it has no cluster CA)",
                               f"copy the cluster's certificate here: `scp -r {n.node.host}:"
                               ".clusterd/tls ~/.clusterd/` (or set CLUSTERD_TLS_CA)", (n.name,)))
        else:
            out.append(Finding(PROBLEM, "tls", f"{n.label} serves plaintext, but this Mac calls "
                               "with TLS (it has a tls folder)",
                               f"give {n.name} the cluster's tls folder and restart `clusterd "
                               "up` there, or remove ~/.clusterd/tls here", (n.name,)))
    return out


def protocol_findings(s: Survey) -> list[Finding]:
    return [Finding(PROBLEM, "protocol", n.report.error,
                    f"install the same clusterd version on {n.name} as on this Mac", (n.name,))
            for n in s.nodes if n.report.status == "incompatible"]


def duplicate_findings(s: Survey) -> list[Finding]:
    return [Finding(PROBLEM, "duplicate", d.message(),
                    "`clusterd up --new-id` on all but one of them",
                    tuple(n.label for n in d.nodes)) for d in s.result.duplicates]


def name_findings(s: Survey) -> list[Finding]:
    """Distinct nodes with one name (two Macs left at the same host name):
    messages and the links file cannot tell them apart."""
    by_name: dict[str, list[NodeSeen]] = {}
    for n in s.nodes:
        if n.node.name and n.report.info is not None:
            by_name.setdefault(n.node.name, []).append(n)
    return [Finding(WARNING, "names", f"{len(group)} nodes are named {name}: "
                    + ", ".join(n.node.address for n in group),
                    f"give each its own name: `clusterd up --name {name}-2` on all but one",
                    (name,)) for name, group in by_name.items() if len(group) > 1]


def network_findings(s: Survey) -> list[Finding]:
    return (discovery_findings(s) + reach_findings(s) + secret_findings(s) + clock_findings(s)
            + tls_findings(s) + protocol_findings(s) + duplicate_findings(s)
            + name_findings(s))


