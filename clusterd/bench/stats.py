"""Small statistics and the machine description every result file carries."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict:
    """Median and spread of repeated measurements."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0}
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        # (max - min) / median: how far apart the repetitions were.
        "spread_pct": 100.0 * (hi - lo) / med if med else None,
        "n": len(values),
        "values": list(values),
    }


def latency_summary(seconds: Sequence[float]) -> dict:
    """p50 / p90 / p99 in milliseconds."""
    return {
        "p50_ms": 1e3 * percentile(seconds, 50),
        "p90_ms": 1e3 * percentile(seconds, 90),
        "p99_ms": 1e3 * percentile(seconds, 99),
        "n": len(seconds),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Cores, RAM, OS, Python, mlx and mlx-lm versions, and the load right now."""
    import mlx.core as mx
    import psutil

    try:
        from importlib.metadata import version

        mlx_lm_version = version("mlx-lm")
    except Exception:
        mlx_lm_version = "unknown"
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "mlx_device": str(mx.default_device()),
        "load_average": load_average(),
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def code_version() -> dict:
    """Which code ran: the git commit, files changed since, and a hash of the
    node's executor (the hop's code), so a result names what it measured."""
    root = Path(__file__).resolve().parents[2]
    out: dict = {}
    try:
        import clusterd.node.executor as ex

        out["executor_sha256"] = hashlib.sha256(Path(ex.__file__).read_bytes()).hexdigest()[:16]
    except Exception:
        pass
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout
        out["git_commit"] = git("rev-parse", "--short", "HEAD").strip()
        out["git_changed"] = [line[3:] for line in git("status", "--porcelain").splitlines()
                              if line[:2].strip() and not line.startswith("??")]
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout
    return out
