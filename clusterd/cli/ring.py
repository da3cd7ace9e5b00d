"""What `run` and `serve` share: the options that choose a model and its
nodes, and opening the ring (find nodes, plan, fetch files, load), with a
re-plan that the healing pipeline calls when a node drops out."""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import click

from clusterd.cli.cluster_options import discovered_addresses, discovery_options
from clusterd.cli.models import ERRORS as FETCH_ERRORS
from clusterd.cli.models import fetch_options, files_for_plan, model_source
from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import connect, load_ring
from clusterd.coordinator.healing import HealingPipeline
from clusterd.coordinator.pipeline import LoadedStage
from clusterd.models.stage import StageLoadError, read_config

OPEN_ERRORS = (StageLoadError, *FETCH_ERRORS)


def ring_options(f):
    """MODEL, --quant/--yes/--ask-above, --peer, --split, --context,
    --prefill-step-size and the discovery flags."""
    for option in reversed([
        click.argument("model"),
        fetch_options,
        click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                     help="A node to use (repeat; the ring follows this order). "
                          "Without --peer, the nodes mDNS finds are used."),
        click.option("--split", default=None, metavar="N,N,...",
                     help="Force layers per node, e.g. 3,2,1."),
        click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
                     help="Context length the split reserves KV cache for."),
        click.option("--prefill-step-size", default=2048, show_default=True,
                     type=click.IntRange(1)),
        functools.partial(discovery_options, with_peer=False),
    ]):
        f = option(f)
    return f


@dataclass
class Ring:
    pipeline: HealingPipeline
    chat: Chat
    config: dict
    model_dir: Path

    @property
    def stages(self) -> list[LoadedStage]:
        return self.pipeline.stages


def open_ring(*, model, quant, yes, ask_above, peers, split, context, prefill_step_size,
              interfaces, no_mdns, browse_timeout, show: bool,
              say: Callable[[str], None]) -> Ring:
    """Raises one of OPEN_ERRORS with a message for the user."""
    source = model_source(model, quant, say)
    if source.local_dir is not None:
        read_config(source.local_dir)  # a bad folder fails before any node is asked
    addresses = list(peers) or discovered_addresses(
        interfaces=interfaces, no_mdns=no_mdns, browse_timeout=browse_timeout)
    nodes = connect(addresses)
    on_loaded = _say_loaded(say) if show else None

    def place(on: list, forced_split: Optional[str]) -> tuple[Path, list[LoadedStage]]:
        model_dir, model_id, ranges = files_for_plan(
            source, on, forced_split, context, yes=yes, ask_above=ask_above, show=show,
            say=say, prefill_step_size=prefill_step_size)
        return model_dir, load_ring(model_dir, on, ranges, on_loaded, model_id=model_id)

    model_dir, stages = place(nodes, split)
    # After a node drops out the forced split no longer applies: the planner decides.
    pipeline = HealingPipeline(nodes, stages, lambda survivors: place(survivors, None)[1],
                               prefill_step_size=prefill_step_size, on_note=say)
    return Ring(pipeline, Chat(model_dir), read_config(model_dir), model_dir)


def _say_loaded(say: Callable[[str], None]):
    def on_loaded(node, reply) -> None:
        s = reply.shard
        say(f"node {node.info.name}: layers [{s.start_layer}, {s.end_layer}) loaded, "
            f"{s.weight_bytes / 2**20:.1f} MiB in {s.load_seconds:.1f}s")
    return on_loaded
