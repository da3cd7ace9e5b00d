"""Which daemons run on this Mac: `clusterd up` writes one small file per
daemon (pid, address) into the clusterd folder, so `clusterd down` can find
them without a port number. Nothing secret is written."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class RunRecord:
    pid: int
    address: str  # host:port a local client can reach
    name: str
    path: Path


def run_dir(home: Path) -> Path:
    d = home / "run"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write(home: Path, port: int, host: str, name: str) -> Path:
    # A daemon on 0.0.0.0 or :: is reachable from here on loopback.
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    path = run_dir(home) / f"node-{port}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "address": f"{local}:{port}", "name": name}))
    tmp.replace(path)
    return path


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def running(home: Path) -> list[RunRecord]:
    """Live daemons of this folder; files of dead processes are cleaned up."""
    out = []
    for path in sorted(run_dir(home).glob("node-*.json")):
        try:
            data = json.loads(path.read_text())
            record = RunRecord(int(data["pid"]), str(data["address"]), str(data["name"]), path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            continue
        if psutil.pid_exists(record.pid):
            out.append(record)
        else:
            path.unlink(missing_ok=True)
    return out
