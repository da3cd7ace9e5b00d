"""Opening a ring: a model source and node addresses -> split the layers,
make sure every node holds its stage's files, load every stage; with the
re-plan that healing calls when a node drops out. The CLI only parses flags
and prints; this is what `run`, `serve` and `pull` share below it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import SplitError, connect, load_ring, plan_ranges
from clusterd.coordinator.healing import HealingPipeline
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import LoadedStage
from clusterd.coordinator.prepare import (ClusterFiles, ModelSource, PrepareFailed, Reporter,
                                          resolve_model, summary_lines)
from clusterd.models.stage import StageLoadError, read_config
from clusterd.models.store import StoreError
from clusterd.security import SecretError

# What opening a ring may raise; each carries a message for the user.
OPEN_ERRORS = (PeerError, SplitError, SecretError, PrepareFailed, StoreError, StageLoadError)

Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class RingOptions:
    """How a ring is planned: forced split, context, prefill step, downloads."""

    split: Optional[str] = None
    context: int = 4096
    prefill_step_size: int = 2048
    yes: bool = False  # download from the hub without asking
    ask_above: int = 2 * 10**9
    show: bool = True  # progress and per-node summaries through `say`


def model_source(model: str, quant: Optional[str], say: Callable[[str], None]) -> ModelSource:
    """MODEL as a folder, a catalog name or a repository id; before any node
    is asked, so a typo fails at once."""
    source = resolve_model(model, quant)
    if quant and source.ref is not None and source.label == model:
        say(f"note: --quant is ignored for a repository id ({model})")
    if source.local_dir is not None:
        read_config(source.local_dir)  # a bad folder fails before any node is asked
    return source


def place_files(source: ModelSource, nodes, split: Optional[str], opts: RingOptions,
                say: Callable[[str], None], confirm: Confirm) -> tuple[Path, str, list]:
    """Split the layers and make sure every node holds its stage's files.
    Returns (folder on this machine with config and tokenizer, repository id
    for LoadShard or "" for a folder every node reads, layer ranges)."""
    if source.ref is None:  # a folder every node reads as is
        return source.local_dir, "", plan_ranges(
            source.local_dir, nodes, split, context=opts.context,
            prefill_step_size=opts.prefill_step_size, on_note=say)
    if opts.show:
        say(f"model: {source.label}")
    files = ClusterFiles(source.ref, nodes, Reporter(show=opts.show))
    meta = files.metadata()
    ranges = plan_ranges(meta, nodes, split, context=opts.context,
                         prefill_step_size=opts.prefill_step_size, on_note=say)
    summary = files.prepare(meta, ranges, yes=opts.yes, ask_above=opts.ask_above,
                            confirm=confirm)
    if opts.show:
        for line in summary_lines(summary):
            say(line)
    return meta, str(source.ref), ranges


@dataclass
class Ring:
    pipeline: HealingPipeline
    chat: Chat
    config: dict
    model_dir: Path

    @property
    def stages(self) -> list[LoadedStage]:
        return self.pipeline.stages


def open_ring(source: ModelSource, addresses: Sequence[str], opts: RingOptions,
              say: Callable[[str], None], confirm: Confirm = lambda text: False) -> Ring:
    """Raises one of OPEN_ERRORS with a message for the user."""
    nodes = connect(addresses)
    on_loaded = _say_loaded(say) if opts.show else None

    def place(on: list, forced_split: Optional[str]) -> tuple[Path, list[LoadedStage]]:
        model_dir, model_id, ranges = place_files(source, on, forced_split, opts, say, confirm)
        return model_dir, load_ring(model_dir, on, ranges, on_loaded, model_id=model_id,
                                    context=opts.context)

    model_dir, stages = place(nodes, opts.split)
    # After a node drops out the forced split no longer applies: the planner decides.
    pipeline = HealingPipeline(nodes, stages, lambda survivors: place(survivors, None)[1],
                               prefill_step_size=opts.prefill_step_size, on_note=say)
    return Ring(pipeline, Chat(model_dir), read_config(model_dir), model_dir)


def _say_loaded(say: Callable[[str], None]):
    def on_loaded(node, reply) -> None:
        s = reply.shard
        say(f"node {node.info.name}: layers [{s.start_layer}, {s.end_layer}) loaded, "
            f"{s.weight_bytes / 2**20:.1f} MiB in {s.load_seconds:.1f}s")
    return on_loaded
