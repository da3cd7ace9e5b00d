"""Node resources, and a catalog of Apple chips for planning with hypothetical nodes.

Bandwidth and RAM options are from public sources (llama.cpp PR #1642,
huggingface.js hardware.ts, Apple specs via press). For a live node, usable memory is the GPU
wired limit the node reads at run time; the wired fraction here is only for hypothetical nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Mapping

GiB = 2**30
MiB = 2**20

# Metal's default working set (what may stay wired) is 75% of RAM on macOS 14/15: 48 of 64 GiB,
# 96 of 128 GiB in llama.cpp logs. macOS 26 reported 84% (107.5 of 128 GiB); we keep the
# lower figure so a plan for hypothetical Macs does not depend on the macOS version.
DEFAULT_WIRED_FRACTION = 0.75


def safe_max_wired_bytes(total_bytes: int) -> int:
    """The highest wired limit we advise: a kernel panic was reported at about 93% wired
    (exo #1972), so stay at or below 90%, and leave at least 8 GiB to macOS and the daemon."""
    return max(0, min(total_bytes * 9 // 10, total_bytes - 8 * GiB))


def default_reserve_bytes(total_bytes: int) -> int:
    """Runtime reserve inside the wired limit (MLX's buffer cache, command buffers, the
    hidden states and logits in flight): 1 GiB on Macs of 64 GiB and more, 1/64 of RAM on
    smaller ones, so a synthetic test model still fits a node capped to a few hundred MB."""
    return min(GiB, total_bytes // 64)


@dataclass(frozen=True)
class ChipSpec:
    key: str  # "m2-ultra"
    name: str  # "M2 Ultra"
    bandwidth_gbs: float  # the fastest bin
    ram_options_gb: tuple[int, ...]
    tflops: float  # approximate GPU FP32 peak; only used for the prefill estimate
    # RAM sizes sold only with a lower-bandwidth bin (M3 Max 14-core: 300 GB/s; M4 Max 14-core: 410).
    slow_bin: Mapping[int, float] = field(default_factory=dict)

    def bandwidth_for(self, ram_gb: int | None) -> float:
        if ram_gb is None:
            # Unknown bin: the slower one, so predictions are not optimistic.
            return min([self.bandwidth_gbs, *self.slow_bin.values()])
        return self.slow_bin.get(ram_gb, self.bandwidth_gbs)


# TFLOPS are approximate public figures (GPU cores x 128 FP32 lanes x 2 x clock); nothing in the
# plan's memory fit depends on them.
CHIPS: tuple[ChipSpec, ...] = (
    ChipSpec("m1", "M1", 68, (8, 16), 2.6),
    ChipSpec("m1-pro", "M1 Pro", 200, (16, 32), 5.2),
    ChipSpec("m1-max", "M1 Max", 400, (32, 64), 10.4),
    ChipSpec("m1-ultra", "M1 Ultra", 800, (64, 128), 20.8),
    ChipSpec("m2", "M2", 100, (8, 16, 24), 3.6),
    ChipSpec("m2-pro", "M2 Pro", 200, (16, 32), 6.8),
    ChipSpec("m2-max", "M2 Max", 400, (32, 64, 96), 13.6),
    ChipSpec("m2-ultra", "M2 Ultra", 800, (64, 128, 192), 27.2),
    ChipSpec("m3", "M3", 100, (8, 16, 24), 4.1),
    ChipSpec("m3-pro", "M3 Pro", 150, (18, 36), 7.4),
    # The 14-core M3 Max (300 GB/s) came with 36 or 96 GB; 48/64/128 GB only with the 16-core.
    ChipSpec("m3-max", "M3 Max", 400, (36, 48, 64, 96, 128), 16.4, {36: 300, 96: 300}),
    ChipSpec("m3-ultra", "M3 Ultra", 819, (96, 256, 512), 28.4),
    ChipSpec("m4", "M4", 120, (16, 24, 32), 4.3),
    ChipSpec("m4-pro", "M4 Pro", 273, (24, 48, 64), 9.2),
    # The 14-core M4 Max (410 GB/s) comes with 36 GB; 48/64/128 GB with the 16-core (546).
    ChipSpec("m4-max", "M4 Max", 546, (36, 48, 64, 128), 18.4, {36: 410}),
)


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.lower()).removeprefix("apple")


def find_chip(text: str) -> ChipSpec | None:
    """'m2-ultra', 'M2 Ultra', 'Apple M2 Ultra' (sysctl's brand string) -> ChipSpec."""
    key = _norm(text)
    for chip in CHIPS:
        if _norm(chip.key) == key:
            return chip
    return None


def bandwidth_for_chip_name(name: str, ram_bytes: int | None = None) -> float | None:
    """Memory bandwidth of a chip named as sysctl names it; None when unknown."""
    chip = find_chip(name)
    if chip is None:
        return None
    return chip.bandwidth_for(round(ram_bytes / GiB) if ram_bytes else None)


@dataclass(frozen=True)
class NodeSpec:
    """What a node offers. ``usable_bytes``: on a Mac the live GPU wired limit, elsewhere the
    available RAM. ``bandwidth_gbs`` 0 or None: unknown. ``reserve_bytes`` None: the default
    runtime reserve. ``max_wired_bytes`` None: safe_max_wired_bytes on a Mac, else usable
    (only a Mac's limit can be raised)."""

    name: str
    total_bytes: int
    usable_bytes: int
    bandwidth_gbs: float | None = None
    free_disk_bytes: int | None = None
    chip: str | None = None
    reserve_bytes: int | None = None
    max_wired_bytes: int | None = None
    tflops: float | None = None
    macos: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if self.total_bytes <= 0 or self.usable_bytes < 0:
            raise ValueError(f"node {self.name}: memory sizes must be positive")

    @property
    def bandwidth(self) -> float | None:
        return self.bandwidth_gbs if self.bandwidth_gbs and self.bandwidth_gbs > 0 else None

    @property
    def reserve(self) -> int:
        return default_reserve_bytes(self.total_bytes) if self.reserve_bytes is None else self.reserve_bytes

    @property
    def raisable_bytes(self) -> int:
        """How high usable memory may go by raising the wired limit (never lowered)."""
        if self.max_wired_bytes is not None:
            cap = self.max_wired_bytes
        elif self.macos:
            cap = safe_max_wired_bytes(self.total_bytes)
        else:
            cap = self.usable_bytes
        # The limit is set in whole MB (iogpu.wired_limit_mb).
        return max(cap // MiB * MiB, self.usable_bytes)

    def with_usable(self, usable: int) -> "NodeSpec":
        return replace(self, usable_bytes=usable)


def hypothetical_node(chip: str, ram_gb: int, name: str | None = None,
                      wired_fraction: float = DEFAULT_WIRED_FRACTION) -> NodeSpec:
    spec = find_chip(chip)
    if spec is None:
        raise ValueError(f"unknown chip {chip!r} (known: {', '.join(c.key for c in CHIPS)})")
    if ram_gb not in spec.ram_options_gb:
        opts = ", ".join(str(r) for r in spec.ram_options_gb)
        raise ValueError(f"{spec.name} comes with {opts} GB, not {ram_gb}")
    if not 0 < wired_fraction <= 1:
        raise ValueError("wired fraction must be in (0, 1]")
    total = ram_gb * GiB  # Apple's "GB" of unified memory are GiB
    return NodeSpec(
        name=name or f"{spec.key}-{ram_gb}", total_bytes=total,
        usable_bytes=int(total * wired_fraction), bandwidth_gbs=spec.bandwidth_for(ram_gb),
        chip=spec.name, tflops=spec.tflops, macos=True,
    )


_NODE_ARG = re.compile(r"^\s*([A-Za-z0-9 _\-]+?)\s*:\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*$")


def parse_node_arg(text: str, wired_fraction: float = DEFAULT_WIRED_FRACTION,
                   start_index: int = 1) -> list[NodeSpec]:
    """'m2-ultra:192x3' -> three hypothetical M2 Ultra 192 GB nodes."""
    m = _NODE_ARG.match(text)
    if not m:
        raise ValueError(f"cannot read node {text!r}: use CHIP:RAM_GB[xCOUNT], e.g. m2-ultra:192x3")
    chip, ram, count = m.group(1), int(m.group(2)), int(m.group(3) or 1)
    if not 1 <= count <= 256:
        raise ValueError(f"node count in {text!r} must be 1 to 256")
    first = hypothetical_node(chip, ram, wired_fraction=wired_fraction)
    return [replace(first, name=f"{first.name}#{start_index + i}") for i in range(count)]
