"""Loading a shard: everything that can be known from the config is checked
first, while what the node holds stays untouched (the layer range; weights,
KV for the plan's sessions x context, prompt cache and prefill workspace
against the usable memory left beside the other shards); then the stage is
read a layer at a time on the compute thread, stopping between layers when
the node stops or the caller gives up. A failed load frees what it took."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from clusterd.models.stage import StageLoadError, load_stage, read_config
from clusterd.node.cache_store import PromptCache
from clusterd.node.heap import free_memory
from clusterd.node.shards import Budget, LimitError, Limits, Shard, ShardTable, budget, spec_for

GiB = 2**30


class Busy(RuntimeError):
    """A load is already in progress."""


class Loader:
    def __init__(self, shards: ShardTable, run: Callable[[Callable[[], Any]], Any],
                 stopping: Callable[[], bool], unload: Callable[[str], int]):
        self._shards = shards
        self._run = run  # on the compute thread, waiting for the result
        self._stopping = stopping
        self._unload = unload
        self._lock = threading.Lock()

    @property
    def loading(self) -> bool:
        return self._lock.locked()

    def load(self, name: str, path: Path, start: int, end: int, limits: Limits,
             usable_bytes: Optional[int], cancelled: Callable[[], bool] = lambda: False) -> Shard:
        if not self._lock.acquire(blocking=False):
            raise Busy("a load is already in progress on this node; wait for it to finish")
        try:
            current = self._shards.get(name)
            if (current is not None and current.stage.path == Path(path).resolve()
                    and (current.stage.bounds.start, current.stage.bounds.end) == (start, end)
                    and current.limits == limits):
                return current  # already held: the next run starts at once
            spec = _spec(path)
            if not 0 <= start < end <= spec.num_layers:
                raise StageLoadError(f"layer range [{start}, {end}) is outside the model's "
                                     f"{spec.num_layers} layers")
            need = budget(spec, start, end, limits, spec.stage_weight_bytes(start, end))
            others = self._shards.reserved_bytes(except_name=name)
            if usable_bytes is not None and others + need.total > usable_bytes:
                raise LimitError(_too_big(need, others, usable_bytes, limits))
            if current is not None:
                self._unload(name)  # never hold two copies of a shard
            t0 = time.monotonic()

            def work() -> Shard:
                stage = load_stage(path, start, end, max_bytes=usable_bytes,
                                   cancelled=lambda: self._stopping() or cancelled())
                return Shard(name=name, stage=stage, limits=limits,
                             budget=budget(spec, start, end, limits, stage.weight_bytes),
                             kv_bytes_per_token=sum(layer.kv_bytes_per_token
                                                    for layer in spec.layers[start:end]),
                             prompt_cache=PromptCache(limits.prompt_cache_bytes))

            try:
                shard = self._run(work)
            except BaseException:
                self._run(free_memory)  # whatever the failed load allocated
                raise
            shard.load_seconds = time.monotonic() - t0
            self._shards.put(shard)
            return shard
        finally:
            self._lock.release()

    def attach_drafter(self, shard: Shard, load: Callable[[], Any], size: Callable[[Any], int],
                       usable_bytes: Optional[int]) -> None:
        """Load the shard's MTP drafter on the compute thread; when it fails or
        does not fit beside what the node holds, the shard drafts by prompt
        lookup and says why (drafts_note)."""
        from clusterd.speculative.drafts import MtpUnavailable

        def work() -> None:
            try:
                drafter = load()
            except MtpUnavailable as e:
                shard.drafts_note = str(e)
                return
            need = size(drafter)
            held = self._shards.reserved_bytes()
            if usable_bytes is not None and held + need > usable_bytes:
                shard.drafts_note = (f"no room for the MTP layer ({need / GiB:.2f} GiB) beside "
                                     f"{held / GiB:.2f} GiB held of {usable_bytes / GiB:.2f} GiB "
                                     "usable")
                free_memory()
                return
            shard.drafter = drafter
            shard.budget = replace(shard.budget, weights=shard.budget.weights + need)

        self._run(work)


def _spec(path: Path):
    config = read_config(Path(path))
    try:
        return spec_for(config)
    except (ValueError, KeyError, TypeError) as e:
        raise StageLoadError(f"config.json does not describe a model clusterd can plan: "
                             f"{str(e)[:200]}") from None


def _too_big(need: Budget, others: int, usable: int, limits: Limits) -> str:
    return (f"the stage needs {need.total / GiB:.2f} GiB (weights {need.weights / GiB:.2f}, "
            f"KV for {limits.max_sessions} sessions of {limits.context} tokens "
            f"{need.kv / GiB:.2f}, prompt cache {need.prompt_cache / GiB:.2f}, prefill "
            f"workspace {need.workspace / GiB:.2f}) beside {others / GiB:.2f} GiB already "
            f"held, but the node has {usable / GiB:.2f} GiB usable")
