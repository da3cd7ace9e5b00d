"""What this machine offers: RAM, usable memory, chip, bandwidth, disk.

On a Mac, usable memory is the GPU wired limit Metal reports (not the RAM
size); elsewhere it is the memory available now. `--memory-limit` caps both.
"""

import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

Sysctl = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class Resources:
    chip: str
    total_bytes: int
    usable_bytes: int
    bandwidth_gbs: float  # 0 when unknown
    free_disk_bytes: int
    platform: str


def run_sysctl(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def mac_usable_bytes(total: int, sysctl: Sysctl, metal_limit: Optional[int]) -> int:
    """The GPU wired limit: `iogpu.wired_limit_mb` when raised by the user (0
    means the system default), else Metal's recommended working set."""
    raised = sysctl("iogpu.wired_limit_mb")
    if raised and raised.isdigit() and int(raised) > 0:
        return min(int(raised) * 2**20, total)
    if metal_limit:
        return min(metal_limit, total)
    return total * 3 // 4  # Metal's default on 16-64 GB Macs, when nothing answers


def mac_chip(sysctl: Sysctl) -> str:
    return sysctl("machdep.cpu.brand_string") or "Apple Silicon"


def _metal_limit() -> Optional[int]:
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except Exception:  # older mlx or no Metal: fall back to sysctl/fraction
        return None
    return None


def bandwidth_for_chip(chip: str, ram_bytes: int) -> float:
    # The chip catalog knows the binned Max variants by their RAM size.
    from shard_planner.hardware import bandwidth_for_chip_name

    return bandwidth_for_chip_name(chip, ram_bytes) or 0.0


def probe(memory_limit: Optional[int] = None, disk_path: Optional[Path] = None) -> Resources:
    vm = psutil.virtual_memory()
    total = int(vm.total)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        chip = mac_chip(run_sysctl)
        usable = mac_usable_bytes(total, run_sysctl, _metal_limit())
    else:
        chip = f"{platform.machine()} cpu"
        usable = int(vm.available)
    if memory_limit is not None:
        usable = min(usable, memory_limit)
        total = min(total, memory_limit)
    disk = shutil.disk_usage(disk_path or Path.home()).free
    return Resources(
        chip=chip,
        total_bytes=total,
        usable_bytes=usable,
        bandwidth_gbs=bandwidth_for_chip(chip, int(vm.total)),
        free_disk_bytes=int(disk),
        platform=f"{platform.system()} {platform.machine()}",
    )


def parse_size(text: str) -> int:
    """'48G', '512M', '1.5T', '1024' (bytes) -> bytes. Binary units."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}: use a number with K, M, G or T, e.g. 48G") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * mult)
