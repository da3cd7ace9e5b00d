"""Wired memory on Metal: keep a stage's weights and KV cache resident.

macOS may page out GPU memory that is not wired; between two tokens a stage's
130 GB of R1 weights would then be read back from disk. As mlx-lm's generate
does (its `wired_limit` context manager), a node sets `mx.set_wired_limit`
while it holds a stage: to what the stage holds (weights + the KV cache the
plan reserved), never above the GPU wired limit Metal reports live
(`max_recommended_working_set_size`, which `sudo sysctl iogpu.wired_limit_mb`
raises), and puts the old limit back on unload and exit. mlx-lm warns when a
model passes 90% of the recommended working set; so does the node, with the
command that makes room. On Linux there is no Metal and nothing happens.

The decision is a pure function of recorded numbers (`wired_decision`); the
`WiredMemory` holder applies it through mlx on the node's compute thread.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

log = logging.getLogger("clusterd.node")

GiB = 2**30
MiB = 2**20
WARN_FRACTION = 0.9  # mlx-lm's warning threshold, and below the 93% panic of exo #1972
DEFAULT_CONTEXT = 4096  # `clusterd run`'s default, when a request names none


@dataclass(frozen=True)
class WiredDecision:
    limit_bytes: int           # for mx.set_wired_limit
    need_bytes: int
    recommended_bytes: int     # Metal's max_recommended_working_set_size
    warnings: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.need_bytes / self.recommended_bytes


def raise_command(need_bytes: int, total_bytes: int) -> Optional[str]:
    """`sudo sysctl iogpu.wired_limit_mb=N` that brings `need_bytes` under 90% of
    the limit, in whole GiB; None when even the safest maximum (90% of RAM,
    8 GiB left to macOS, as the planner advises) cannot."""
    from shard_planner.hardware import safe_max_wired_bytes

    mb = math.ceil(need_bytes / WARN_FRACTION / GiB) * 1024
    if not total_bytes or mb * MiB > safe_max_wired_bytes(total_bytes):
        return None
    return f"sudo sysctl iogpu.wired_limit_mb={mb}"


def wired_decision(need_bytes: int, device_info: Mapping[str, Any]) -> Optional[WiredDecision]:
    """What to wire for a stage holding `need_bytes`, from Metal's device
    info; None where there is no Metal working set (Linux, CPU backend)."""
    recommended = int(device_info.get("max_recommended_working_set_size", 0) or 0)
    if recommended <= 0 or need_bytes <= 0:
        return None
    total = int(device_info.get("memory_size", 0) or 0)
    limit = min(need_bytes, recommended)  # mx.set_wired_limit refuses more than the system's
    warnings = []
    share = need_bytes / recommended
    fix = raise_command(need_bytes, total)
    how = (f"raise the GPU wired limit (until reboot): {fix}" if fix else
           "move layers to other nodes (`clusterd plan` shows a split that fits)")
    if need_bytes > recommended:
        warnings.append(
            f"this stage holds {need_bytes / GiB:.1f} GiB but Metal keeps at most "
            f"{recommended / GiB:.1f} GiB wired on this Mac: the rest can be paged out and "
            f"every token slows down; {how}")
    elif share > WARN_FRACTION:
        warnings.append(
            f"this stage holds {need_bytes / GiB:.1f} GiB, {share:.0%} of the "
            f"{recommended / GiB:.1f} GiB Metal keeps wired (above {WARN_FRACTION:.0%} is "
            f"close to the limit: slow, and a kernel panic was reported near 93%); {how}")
    return WiredDecision(limit, need_bytes, recommended, tuple(warnings))


def stage_need_bytes(stage: Any, context: int = 0, sessions: int = 0) -> int:
    """Weights + the KV cache of `sessions` sessions of `context` tokens for
    the stage's layers, counted by the planner's accounting of the model."""
    from shard_planner.model_spec import model_spec_from_config

    b = stage.bounds
    spec = model_spec_from_config(stage.config)
    kv = spec.kv_bytes(b.start, b.end, context or DEFAULT_CONTEXT, sessions or 1)
    return int(stage.weight_bytes + kv)


class MetalWiring:
    """mlx's side: device info and the wired limit (only where Metal runs)."""

    def available(self) -> bool:
        import mlx.core as mx

        try:
            return bool(mx.metal.is_available())
        except AttributeError:
            return False

    def device_info(self) -> dict:
        import mlx.core as mx

        return dict(mx.metal.device_info())

    def set_limit(self, limit: int) -> int:
        import mlx.core as mx

        return int(mx.set_wired_limit(limit))


class WiredMemory:
    """The node's wired limit while it holds a stage. `run` executes on the
    compute thread (the limit must not change during an evaluation)."""

    def __init__(self, run: Callable[[Callable[[], Any]], Any],
                 metal: Optional[MetalWiring] = None):
        self._run = run
        self._metal = metal or MetalWiring()
        self._lock = threading.Lock()
        self._previous: Optional[int] = None  # the limit before we set ours
        self.current: Optional[WiredDecision] = None

    def hold(self, stage: Any, context: int = 0, sessions: int = 0) -> Optional[WiredDecision]:
        if not self._metal.available():
            return None
        try:
            need = stage_need_bytes(stage, context, sessions)
        except Exception as e:  # an architecture the planner does not model: weights alone
            log.warning("cannot count this stage's KV cache (%s); wiring its weights", e)
            need = int(stage.weight_bytes)
        return self.hold_bytes(need)

    def hold_bytes(self, need: int) -> Optional[WiredDecision]:
        """Wire `need` bytes (what the node's shards hold), within Metal's limit."""
        if not self._metal.available():
            return None
        decision = wired_decision(need, self._metal.device_info())
        if decision is None:
            return None
        with self._lock:
            previous = self._run(lambda: self._metal.set_limit(decision.limit_bytes))
            if self._previous is None:
                self._previous = previous
            self.current = decision
        log.info("wired %.1f GiB of %.1f GiB Metal keeps resident", decision.limit_bytes / GiB,
                 decision.recommended_bytes / GiB)
        for text in decision.warnings:
            log.warning("%s", text)
        return decision

    def release(self) -> None:
        with self._lock:
            if self._previous is None:
                return
            previous, self._previous, self.current = self._previous, None, None
            self._run(lambda: self._metal.set_limit(previous))
        log.info("wired limit back to %d bytes", previous)
