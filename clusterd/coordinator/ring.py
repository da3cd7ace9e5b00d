"""Opening a ring: a model source and node addresses -> split the layers,
make sure every node holds its stage's files, load every stage; with the
re-plan that healing calls when a node drops out. The CLI only parses flags
and prints; this is what `run`, `serve` and `pull` share below it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from clusterd.coordinator.chat import Chat
from clusterd.coordinator.cluster import (SplitError, connect, connect_reachable, load_ring,
                                          plan_ranges)
from clusterd.coordinator.engine import Engine
from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import LoadedStage, RingClient
from clusterd.coordinator.prepare import (ClusterFiles, ModelSource, PrepareFailed, Reporter,
                                          resolve_model, summary_lines)
from clusterd.models.stage import StageLoadError, read_config
from clusterd.models.store import StoreError
from clusterd.models.catalog import original_repo
from clusterd.security import SecretError
from clusterd.speculative.drafts import MtpUnavailable
from clusterd.speculative.fetch import fetch_mtp
from clusterd.wire import clusterd_pb2 as pb

# What opening a ring may raise; each carries a message for the user.
OPEN_ERRORS = (PeerError, SplitError, SecretError, PrepareFailed, StoreError, StageLoadError)

Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class RingOptions:
    """How a ring is planned: forced split, context, sessions, prefill step,
    prompt cache, downloads."""

    split: Optional[str] = None
    context: int = 4096
    sessions: int = 1  # sessions at once: the KV room every stage reserves
    prefill_step_size: int = 2048
    prompt_cache_tokens: Optional[int] = None  # None: one context's worth
    draft: str = "auto"  # auto: the model's MTP layer when it can be had and fits, else lookup
    mtp_from: Optional[str] = None  # the original checkpoint (folder or repository id)
    yes: bool = False  # download from the hub without asking
    ask_above: int = 2 * 10**9
    show: bool = True  # progress and per-node summaries through `say`

    @property
    def limits(self) -> pb.ShardLimits:
        return pb.ShardLimits(context=self.context, max_sessions=self.sessions,
                              prefill_step=self.prefill_step_size)

    @property
    def cache_tokens(self) -> int:
        return self.context if self.prompt_cache_tokens is None else self.prompt_cache_tokens


def model_source(model: str, quant: Optional[str], say: Callable[[str], None]) -> ModelSource:
    """MODEL as a folder, a catalog name or a repository id; before any node
    is asked, so a typo fails at once."""
    source = resolve_model(model, quant)
    if quant and source.ref is not None and source.label == model:
        say(f"note: --quant is ignored for a repository id ({model})")
    if source.local_dir is not None:
        read_config(source.local_dir)  # a bad folder fails before any node is asked
    return source


def model_files(source: ModelSource, nodes, opts: RingOptions, say: Callable[[str], None]
                ) -> tuple[Path, str, Optional[ClusterFiles]]:
    """(folder on this machine with config and tokenizer, repository id for
    LoadShard or "" for a folder every node reads, the cluster's files of a
    repository or None)."""
    if source.ref is None:  # a folder every node reads as is
        return source.local_dir, "", None
    if opts.show:
        say(f"model: {source.label}")
    files = ClusterFiles(source.ref, nodes, Reporter(show=opts.show))
    return files.metadata(), str(source.ref), files


def fetch_stages(files: Optional[ClusterFiles], meta: Path, ranges: list, opts: RingOptions,
                 say: Callable[[str], None], confirm: Confirm) -> None:
    """Make sure every node holds its stage's files (a folder needs nothing)."""
    if files is None:
        return
    summary = files.prepare(meta, ranges, yes=opts.yes, ask_above=opts.ask_above,
                            confirm=confirm)
    if opts.show:
        for line in summary_lines(summary):
            say(line)


def place_files(source: ModelSource, nodes, split: Optional[str], opts: RingOptions,
                say: Callable[[str], None], confirm: Confirm,
                plan_on: Optional[list] = None) -> tuple[Path, str, list]:
    """Split the layers and make sure every node holds its stage's files.
    Returns (folder on this machine with config and tokenizer, repository id
    for LoadShard or "" for a folder every node reads, layer ranges).
    `plan_on`: the nodes as the split sees them (default `nodes`)."""
    meta, model_id, files = model_files(source, nodes, opts, say)
    ranges = plan_ranges(meta, plan_on or nodes, split, context=opts.context,
                         sessions=opts.sessions, prefill_step_size=opts.prefill_step_size,
                         prompt_cache_tokens=opts.cache_tokens,
                         draft="mtp" if mtp_wanted(source, opts) else None, on_note=say)
    fetch_stages(files, meta, ranges, opts, say, confirm)
    return meta, model_id, ranges


class Room(Protocol):
    """What other models hold on shared nodes, for a re-plan (coordinator.rings)."""

    def views(self, nodes: list, shard: str) -> list:
        """`nodes` as the split must see them: live, with what shards other
        than `shard` reserve taken off their usable memory."""

    def release(self, views: list, ranges: list, shard: str) -> None:
        """Unload `shard` from the nodes the new placement leaves out."""


class RingPlacer:
    """Places the model on given nodes (the engine calls it to heal and to
    re-form the ring); after the first placement the planner decides the
    split (a forced --split no longer applies to other nodes). With a
    `room`, the model shares its nodes with others: each stage is loaded
    under the name `shard`, and a re-plan sees only what the others leave."""

    def __init__(self, source: ModelSource, opts: RingOptions, say, confirm,
                 addresses: Callable[[], Sequence[str]], nodes: list, *, shard: str = "",
                 room: Optional[Room] = None):
        self._source, self._opts, self._say, self._confirm = source, opts, say, confirm
        self._addresses = addresses
        self.nodes = nodes
        self.shard = shard
        self._room = room
        self._on_loaded = _say_loaded(say) if opts.show else None

    def place(self, nodes: list, split: Optional[str]) -> tuple[Path, list[LoadedStage]]:
        views = self._room.views(nodes, self.shard) if self._room is not None else None
        model_dir, model_id, ranges = place_files(self._source, nodes, split, self._opts,
                                                  self._say, self._confirm, plan_on=views)
        mtp = mtp_spec(self._source, self._opts, model_dir, nodes, ranges, self._say,
                       self._confirm)
        stages = self.load(model_dir, model_id, nodes, ranges, mtp)
        if mtp is not None and stages[-1].drafts != "mtp":
            self._say(f"drafts: {stages[-1].drafts_note or 'the MTP layer did not load'}; "
                      "drafting by prompt lookup")
        if views is not None:
            self._room.release(views, ranges, self.shard)
        return model_dir, stages

    def load(self, model_dir: Path, model_id: str, nodes: list, ranges: list,
             mtp: Optional[pb.MtpSpec] = None) -> list[LoadedStage]:
        return load_ring(model_dir, nodes, ranges, self._on_loaded, model_id=model_id,
                         limits=self._opts.limits, shard=self.shard,
                         prompt_cache_tokens=self._opts.cache_tokens, mtp=mtp)

    def replan(self, nodes: list) -> list[LoadedStage]:
        return self.place(nodes, None)[1]

    def rediscover(self) -> list:
        return connect_reachable(list(self._addresses()))


@dataclass
class Ring:
    client: RingClient  # replaced when the ring heals
    chat: Chat
    config: dict
    model_dir: Path
    placer: RingPlacer
    options: RingOptions

    @property
    def stages(self) -> list[LoadedStage]:
        return self.client.stages

    @property
    def nodes(self) -> list:
        return self.placer.nodes


def open_ring(source: ModelSource, addresses: Sequence[str], opts: RingOptions,
              say: Callable[[str], None], confirm: Confirm = lambda text: False,
              rediscover: Optional[Callable[[], Sequence[str]]] = None) -> Ring:
    """Raises one of OPEN_ERRORS with a message for the user. `rediscover`
    finds nodes again after a loss (default: the same addresses)."""
    nodes = connect(addresses)
    placer = RingPlacer(source, opts, say, confirm, rediscover or (lambda: list(addresses)), nodes)
    model_dir, stages = placer.place(nodes, opts.split)
    return Ring(RingClient(stages), Chat(model_dir), read_config(model_dir), model_dir, placer,
                opts)


def open_engine(ring: Ring, name: str, *, queue_limit: int = 64,
                on_note: Callable[[str], None] = lambda text: None) -> Engine:
    o = ring.options
    return Engine(ring, name=name, context=o.context, max_sessions=o.sessions,
                  queue_limit=queue_limit, prefill_step_size=o.prefill_step_size,
                  draft=o.draft, on_note=on_note)


def mtp_wanted(source: ModelSource, opts: RingOptions) -> bool:
    """Whether this ring tries the model's MTP layer: asked for (or auto), and
    an original checkpoint to take it from is known."""
    if opts.draft not in ("auto", "mtp"):
        return False
    if opts.mtp_from:
        return True
    return source.ref is not None and original_repo(source.ref.repo_id) is not None


def mtp_spec(source: ModelSource, opts: RingOptions, model_dir: Path, nodes: list, ranges,
             say: Callable[[str], None], confirm: Confirm) -> Optional[pb.MtpSpec]:
    """Get the MTP layer's files onto the last stage's node; None (and why,
    when it was asked for) if it cannot be had: the ring then drafts by lookup."""
    if not mtp_wanted(source, opts):
        if opts.draft == "mtp":
            say("drafts: no original checkpoint is known for this model (--mtp-from names "
                "one); drafting by prompt lookup")
        return None
    if opts.mtp_from and Path(opts.mtp_from).expanduser().is_dir():
        return pb.MtpSpec(original_path=str(Path(opts.mtp_from).expanduser().resolve()))
    if source.ref is None:
        say("drafts: a model folder needs --mtp-from FOLDER for its MTP layer; drafting by "
            "prompt lookup")
        return None
    used = [n for n, r in zip(nodes, ranges) if r is not None]
    if opts.draft == "auto" and not _holds_original(used[-1], source):
        return None  # auto takes the layer when it is here; `--draft mtp` fetches it
    try:
        files = fetch_mtp(source.ref, model_dir, used[-1], used[:-1], Reporter(show=opts.show),
                          yes=opts.yes, ask_above=opts.ask_above, confirm=confirm)
    except MtpUnavailable as e:
        say(f"drafts: {e}; drafting by prompt lookup")
        return None
    return pb.MtpSpec(original_id=str(files.original))


def _holds_original(node, source: ModelSource) -> bool:
    """Whether the last stage's node already holds files of the model's
    original checkpoint (a run with `--draft mtp` fetched them)."""
    repo = original_repo(source.ref.repo_id)
    try:
        return bool(repo) and bool(node.peer.list_files(repo))
    except PeerError:
        return False


def _say_loaded(say: Callable[[str], None]):
    def on_loaded(node, reply) -> None:
        s = reply.shard
        say(f"node {node.info.name}: layers [{s.start_layer}, {s.end_layer}) loaded, "
            f"{s.weight_bytes / 2**20:.1f} MiB in {s.load_seconds:.1f}s")
    return on_loaded
