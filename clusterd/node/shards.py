"""The shards a node holds (usually one; two when a distill sits beside an
R1 stage), each with the limits it was loaded for and its prompt cache.
What a shard may hold is decided by the plan and checked here: weights,
KV caches for `max_sessions` sessions of `context` tokens, the prompt
cache and a prefill workspace must fit the node's usable memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from clusterd.models.stage import StageModel
from clusterd.node.cache_store import PromptCache
from clusterd.wire import clusterd_pb2 as pb
from shard_planner.model_spec import ModelSpec, model_spec_from_config

# Limits a LoadShard may ask for: generous, but no crafted number can make
# the node reserve memory it cannot count.
MAX_CONTEXT = 1 << 20
MAX_SESSIONS = 1024
MAX_PREFILL_STEP = 1 << 16
# What a LoadShard without limits gets: the planner's defaults.
DEFAULT_LIMITS = pb.ShardLimits(context=4096, max_sessions=1, prefill_step=2048,
                                prompt_cache_bytes=0, ring_stages=1)


class LimitError(ValueError):
    """A shard's limits cannot be granted; the message gives the numbers."""


@dataclass(frozen=True)
class Limits:
    context: int
    max_sessions: int
    prefill_step: int
    prompt_cache_bytes: int
    ring_stages: int

    @classmethod
    def from_wire(cls, msg: Optional[pb.ShardLimits]) -> "Limits":
        m = msg if msg is not None and msg.ByteSize() else DEFAULT_LIMITS
        d = DEFAULT_LIMITS
        lim = cls(context=m.context or d.context, max_sessions=m.max_sessions or d.max_sessions,
                  prefill_step=m.prefill_step or d.prefill_step,
                  prompt_cache_bytes=m.prompt_cache_bytes, ring_stages=m.ring_stages or 1)
        if lim.context > MAX_CONTEXT:
            raise LimitError(f"context {lim.context} is above the most a node accepts ({MAX_CONTEXT})")
        if lim.max_sessions > MAX_SESSIONS:
            raise LimitError(f"max_sessions {lim.max_sessions} is above {MAX_SESSIONS}")
        if lim.prefill_step > MAX_PREFILL_STEP:
            raise LimitError(f"prefill_step {lim.prefill_step} is above {MAX_PREFILL_STEP}")
        if lim.ring_stages > 256:
            raise LimitError(f"ring_stages {lim.ring_stages} is above 256")
        return lim

    def to_wire(self) -> pb.ShardLimits:
        return pb.ShardLimits(context=self.context, max_sessions=self.max_sessions,
                              prefill_step=self.prefill_step,
                              prompt_cache_bytes=self.prompt_cache_bytes,
                              ring_stages=self.ring_stages)


@dataclass(frozen=True)
class Budget:
    """What a shard will hold at most, in bytes."""

    weights: int
    kv: int
    prompt_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.prompt_cache + self.workspace


def budget(spec: ModelSpec, start: int, end: int, limits: Limits, weight_bytes: int) -> Budget:
    return Budget(weights=weight_bytes,
                  kv=spec.kv_bytes(start, end, limits.context, limits.max_sessions),
                  prompt_cache=limits.prompt_cache_bytes,
                  workspace=spec.workspace_bytes(start, end, limits.context, limits.prefill_step))


def spec_for(config: dict) -> ModelSpec:
    return model_spec_from_config(config)


@dataclass
class Shard:
    name: str
    stage: StageModel
    limits: Limits
    budget: Budget
    kv_bytes_per_token: int
    prompt_cache: PromptCache
    load_seconds: float = 0.0
    closed: bool = False
    drafter: Any = None  # the MTP layer's drafter (clusterd.models.mtp.MtpDrafter), last stage
    drafts_note: str = ""  # why there is none, when it was asked for

    def to_wire(self, sessions: int) -> pb.LoadedShard:
        b = self.stage.bounds
        return pb.LoadedShard(
            model_path=str(self.stage.path), model_type=self.stage.model_type,
            start_layer=b.start, end_layer=b.end, num_layers=b.num_layers, first=b.first,
            last=b.last, weight_bytes=self.stage.weight_bytes, load_seconds=self.load_seconds,
            shard=self.name, limits=self.limits.to_wire(),
            kv_bytes_per_token=self.kv_bytes_per_token, sessions=sessions,
            prompt_cache_bytes=self.prompt_cache.nbytes,
            prompt_cache_entries=len(self.prompt_cache),
            drafts="mtp" if self.drafter is not None else ("ngram" if b.last else ""),
            drafts_note=self.drafts_note)


class ShardTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[str, Shard] = {}

    def get(self, name: str) -> Optional[Shard]:
        with self._lock:
            return self._shards.get(name)

    def put(self, shard: Shard) -> None:
        with self._lock:
            self._shards[shard.name] = shard

    def pop(self, name: str) -> Optional[Shard]:
        with self._lock:
            s = self._shards.pop(name, None)
        if s is not None:
            s.closed = True
        return s

    def all(self) -> list[Shard]:
        with self._lock:
            return list(self._shards.values())

    def reserved_bytes(self, except_name: str = "") -> int:
        with self._lock:
            return sum(s.budget.total for n, s in self._shards.items() if n != except_name)
