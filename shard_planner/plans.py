"""What a plan is: its stages, verdict and advice (the planner makes them, everyone reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from shard_planner.costs import LinkSpec
from shard_planner.hardware import NodeSpec
from shard_planner.links import Hop, PairLinks
from shard_planner.model_spec import PREFILL_CHUNK, ModelSpec

__all__ = ["DEFAULT_HEADROOM", "DOES_NOT_FIT", "DRAFT_LOOKUP", "DRAFT_MTP", "FITS",
           "FITS_WIRED", "NO_MTP_ROOM", "Plan", "StagePlan"]

FITS = "fits"
FITS_WIRED = "fits-with-wired-limit"
DOES_NOT_FIT = "does-not-fit"
# Share of usable memory a plan leaves free: Metal must never hit the wired limit, and a
# kernel panic was reported at about 93% wired (exo #1972).
DEFAULT_HEADROOM = 0.05
# Drafts for speculative decoding: DeepSeek's MTP module on the last stage, or prompt
# lookup (n-grams of the context, no memory) when there is no room for it.
DRAFT_MTP = "mtp"
DRAFT_LOOKUP = "lookup"
NO_MTP_ROOM = "no room for the MTP layer on the last stage; drafts fall back to prompt lookup"


@dataclass(frozen=True)
class StagePlan:
    node: NodeSpec
    node_index: int  # position in the node list given to plan()
    start: int
    end: int  # layers [start, end)
    weight_bytes: int  # the main model's (embedding on the first stage, head on the last)
    kv_bytes: int  # sessions x context
    workspace_bytes: int  # prefill transients (an estimate)
    reserve_bytes: int
    headroom_bytes: int
    usable_bytes: int  # usable memory the plan relies on (the raised limit, if one is needed)
    current_usable_bytes: int  # usable memory the node reports now
    active_bytes: int  # bytes read per decoded token
    wired_limit_mb: int | None = None  # `sudo sysctl iogpu.wired_limit_mb=N` when not None
    prompt_cache_bytes: int = 0  # finished sessions' KV kept for reuse
    mtp_bytes: int = 0  # the MTP module (and its embedding copy) on the last stage
    mtp_kv_bytes: int = 0  # the MTP layer's own KV cache

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def need_bytes(self) -> int:
        """Everything the stage holds, headroom excluded."""
        return (self.weight_bytes + self.kv_bytes + self.prompt_cache_bytes
                + self.workspace_bytes + self.reserve_bytes + self.mtp_bytes + self.mtp_kv_bytes)

    @property
    def sysctl(self) -> str | None:
        if self.wired_limit_mb is None:
            return None
        return f"sudo sysctl iogpu.wired_limit_mb={self.wired_limit_mb}"


@dataclass(frozen=True)
class Plan:
    verdict: str  # "fits" | "fits-with-wired-limit" | "does-not-fit"
    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    stages: tuple[StagePlan, ...]  # empty when it does not fit
    advice: tuple[str, ...]
    context: int
    sessions: int
    objective: str  # "time" or "memory"
    link: LinkSpec  # the preset, for hops no measurement covers
    headroom: float
    left_out: tuple[str, ...] = ()
    shortfall_bytes: int = 0  # with every wired limit raised as far as is safe
    prefill_chunk: int = PREFILL_CHUNK  # tokens per prefill step the workspace is sized for
    prompt_cache_tokens: int = 0  # tokens of finished sessions' KV each stage keeps
    draft: str | None = None  # "mtp", "lookup" (asked for MTP, no room), None (no drafts)
    hops: tuple[Hop, ...] = ()  # stage i -> i+1, then last -> first; none for one stage
    links: PairLinks = field(default_factory=lambda: MappingProxyType({}), compare=False,
                             repr=False)

    @property
    def total_weight_bytes(self) -> int:
        return self.model.total_weight_bytes

    @property
    def fits(self) -> bool:
        return self.verdict != DOES_NOT_FIT

    @property
    def notes(self) -> tuple[str, ...]:
        return self.model.notes

    @property
    def wired_limit_commands(self) -> tuple[tuple[str, str], ...]:
        return tuple((s.node.name, s.sysctl) for s in self.stages if s.sysctl)

