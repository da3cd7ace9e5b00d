"""Before a load: every node holds the files of its stage, each file pulled
from the internet at most once per cluster.

1. The coordinator gets the small files (config, tokenizer, index) into its
   own store: from its store, else from a node that has them, else the first
   node fetches them from the hub and the coordinator copies them from it.
2. It asks every node which of its stage's files it already holds.
3. Each file no node holds is given to exactly one node that needs it, to
   fetch from the hub (asking first when that is a large download).
4. Phase A: every node fetches what other nodes hold, plus its hub share.
   Phase B: what it still needs, now held by the node that fetched it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.cluster import Node
from clusterd.models.files import INDEX_FILE, SINGLE_FILE, meta_files, stage_files
from clusterd.models.store import ModelRef, ModelStore, is_repo_id
from clusterd.node.hub import Hub, HubError
from clusterd.node.sources import PrepareError, Preparer, Stubs
from clusterd.wire import clusterd_pb2 as pb

DEFAULT_ASK_BYTES = 2 * 10**9  # ask before pulling more than this from the internet


class PrepareFailed(RuntimeError):
    """Files that cannot be had; the message says which, where, and how to get them."""


@dataclass(frozen=True)
class ModelSource:
    """What run and pull work from: a local folder every node reads as is
    (ref None, exactly as before), or a repository each node holds in its store."""

    local_dir: Optional[Path]
    ref: Optional[ModelRef]
    label: str


def resolve_model(model: str, quant: Optional[str]) -> ModelSource:
    """A folder, a catalog name (+ quantization) or a repository id."""
    from clusterd.models import catalog

    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path, None, str(path))
    # A path with a typo must not be taken for a repository id ("models/my-r1").
    if model.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir()):
        raise PrepareFailed(f"model directory {path} does not exist")
    try:
        r = catalog.resolve(model, quant)
    except catalog.CatalogError as e:
        if "/" in model and is_repo_id(model):
            return ModelSource(None, ModelRef.parse(model), model)
        raise PrepareFailed(f"{e} (or a repository id such as mlx-community/DeepSeek-R1-4bit, "
                            "or a model folder); `clusterd models` lists the names") from None
    if not r.repo:
        raise PrepareFailed(f"{r.name} {r.label}: {r.note}. Convert it with mlx_lm.convert and "
                            "pass the folder, or pick another --quant (see `clusterd models`)")
    return ModelSource(None, ModelRef.parse(r.repo), f"{r.name} {r.label} ({r.repo})")


@dataclass
class Summary:
    seconds: float = 0.0
    by_node: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> source -> bytes
    names: dict[str, str] = field(default_factory=dict)  # node address -> node name

    def bytes_from(self, prefix: str) -> int:
        return sum(b for s in self.by_node.values() for k, b in s.items() if k.startswith(prefix))

    @property
    def transferred(self) -> int:
        return self.bytes_from("hub") + self.bytes_from("peer")


class ClusterFiles:
    def __init__(self, ref: ModelRef, nodes: Sequence[Node], reporter: Reporter, *,
                 store: Optional[ModelStore] = None, hub: Optional[Hub] = None):
        self.ref = ref
        self.nodes = list(nodes)
        self.reporter = reporter
        reporter.names.update({n.peer.address: n.peer.name for n in self.nodes})
        self.store = store or ModelStore()
        self.hub = hub or Hub()
        self._listing = None

    # -- 1. the coordinator's own small files ----------------------------------
    def metadata(self) -> Path:
        """A folder on this machine with the model's config, tokenizer and index."""
        snap = self.store.snapshot(self.ref)
        if snap is not None and _meta_complete(snap):
            return snap
        listings = self._pool(lambda n: n.peer.list_files(str(self.ref)))
        holder = next((n for n, files in zip(self.nodes, listings)
                       if _meta_complete_names({f.path for f in files})), None)
        if holder is None:
            names = meta_files(self._hub_listing().files)
            first = self.nodes[0]
            self._run_node(first, pb.PrepareFilesRequest(model=str(self.ref), paths=names,
                                                         allow_hub=True))
            holder = first
        else:
            names = meta_files(f.path for f in listings[self.nodes.index(holder)])
        stubs = Stubs()
        try:
            Preparer(self.store, stubs, self.hub).prepare(
                pb.PrepareFilesRequest(model=str(self.ref), paths=names,
                                       peer_addresses=[holder.peer.address]), lambda m: None)
        except PrepareError as e:
            raise PrepareFailed(f"this machine could not copy the model's config and tokenizer "
                                f"from {holder.peer.name}: {e}") from None
        finally:
            stubs.close()
        return self.store.snapshot(self.ref)

    def _hub_listing(self):
        if self._listing is None:
            try:
                self._listing = self.hub.listing(self.ref.repo_id, self.ref.revision)
            except HubError as e:
                raise PrepareFailed(
                    f"no node holds {self.ref} and the hub cannot be used: {e}\n"
                    + _how_to_get(self.ref, None)) from None
        return self._listing

    # -- 2-4. every node's stage files -------------------------------------------
    def prepare(self, meta_dir: Path, ranges: Sequence[Optional[tuple[int, int]]], *,
                yes: bool = False,
                ask_above: int = DEFAULT_ASK_BYTES,
                confirm: Callable[[str], bool] = lambda text: False) -> Summary:
        t0 = time.monotonic()
        meta = meta_files(p.name for p in meta_dir.iterdir())
        # A node the plan leaves out (range None) needs nothing, but can still serve files.
        needs = [stage_files(meta_dir, r[0], r[1], meta) if r else [] for r in ranges]
        everything = sorted(set().union(*needs))
        held = self._pool(lambda n: {f.path: f.size for f in n.peer.list_files(
            str(self.ref), everything)})
        anywhere = set().union(*held)
        nowhere = [p for p in everything if p not in anywhere]
        sizes = {p: s for h in held for p, s in h.items()}
        if nowhere:
            try:
                listing = self._hub_listing()
            except PrepareFailed as e:
                raise PrepareFailed(self._missing_text(nowhere, needs, str(e).split("\n")[0]))
            absent = [p for p in nowhere if p not in listing.files]
            if absent:
                raise PrepareFailed(f"{self.ref} on the hub has no {', '.join(absent[:3])}")
            sizes.update({p: listing.files[p].size for p in nowhere})
        self._check_disk(needs, held, sizes)
        hub_bytes = sum(sizes[p] for p in nowhere)
        if hub_bytes > ask_above and not yes:
            text = (f"Download {human(hub_bytes)} of {self.ref} from the hub "
                    f"({len(nowhere)} files, once for the whole cluster)?")
            if not confirm(text):
                raise PrepareFailed("not downloading; pass --yes to download without asking")
        # Each file nobody has goes to one node that needs it, spreading the bytes.
        downloader: dict[str, int] = {}
        load = [0] * len(self.nodes)
        for p in sorted(nowhere, key=lambda p: -sizes[p]):
            i = min((i for i, need in enumerate(needs) if p in need), key=lambda i: load[i])
            downloader[p] = i
            load[i] += sizes[p]
        phase_a = [[p for p in need if p in anywhere or downloader.get(p) == i]
                   for i, need in enumerate(needs)]
        phase_b = [[p for p in need if p not in phase_a[i]] for i, need in enumerate(needs)]
        for i, node in enumerate(self.nodes):
            self.reporter.expect(node.peer.name, sum(
                sizes.get(p, 0) for p in needs[i] if p not in held[i]))
        self._phase(phase_a)
        if any(phase_b):
            self._phase(phase_b)
        self.reporter.close()
        return Summary(time.monotonic() - t0, self.reporter.by_source(),
                       {n.peer.address: n.peer.name for n in self.nodes})

    def _phase(self, paths: list[list[str]]) -> None:
        addresses = [n.peer.address for n in self.nodes]

        def run(i: int) -> Optional[str]:
            if not paths[i]:
                return None
            others = [a for j, a in enumerate(addresses) if j != i]
            try:
                self._run_node(self.nodes[i], pb.PrepareFilesRequest(
                    model=str(self.ref), paths=paths[i], peer_addresses=others, allow_hub=True))
            except PrepareFailed as e:
                return str(e)
            return None

        errors = [e for e in self._pool_index(run) if e]
        if errors:
            raise PrepareFailed("\n".join(errors) + "\n" + _how_to_get(self.ref, None))

    def _run_node(self, node: Node, request: pb.PrepareFilesRequest) -> None:
        last = None
        for msg in node.peer.prepare_files(request):
            self.reporter.update(node.peer.name, msg)
            last = msg
        if last is None or not last.finished:
            raise PrepareFailed(last.error if last is not None and last.error
                                else f"node {node.peer.name} stopped without finishing")

    def _check_disk(self, needs, held, sizes) -> None:
        for i, node in enumerate(self.nodes):
            incoming = sum(sizes.get(p, 0) for p in needs[i] if p not in held[i])
            free = node.info.free_disk_bytes
            if free and incoming > free:
                raise PrepareFailed(
                    f"node {node.peer.name} needs {human(incoming)} for its files but has "
                    f"{human(free)} free; free some space or give it fewer layers (--split)")

    def _missing_text(self, nowhere, needs, reason: str) -> str:
        lines = [f"{len(nowhere)} file(s) of {self.ref} are on no node, and {reason}"]
        for i, node in enumerate(self.nodes):
            mine = [p for p in needs[i] if p in nowhere]
            if mine:
                shown = ", ".join(mine[:5]) + (f" and {len(mine) - 5} more" if len(mine) > 5 else "")
                lines.append(f"  node {node.peer.name} lacks {shown}")
        return "\n".join(lines) + "\n" + _how_to_get(self.ref, nowhere)

    def _pool(self, fn):
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(fn, self.nodes))

    def _pool_index(self, fn):
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(fn, range(len(self.nodes))))


def _meta_complete_names(names: set) -> bool:
    return ("config.json" in names and (INDEX_FILE in names or SINGLE_FILE in names)
            and bool(names & {"tokenizer.json", "tokenizer_config.json"}))


def _meta_complete(snap: Path) -> bool:
    return _meta_complete_names({p.name for p in snap.iterdir()})


def _how_to_get(ref: ModelRef, files: Optional[Sequence[str]]) -> str:
    cmd = f"huggingface-cli download {ref.repo_id}"
    if files:
        cmd += " " + " ".join(f"--include '{f}'" for f in files[:3]) + (
            " ..." if len(files) > 3 else "")
    return (f"To get them: on a machine with internet run `{cmd}`, then copy its "
            f"~/.cache/huggingface/hub/models--{ref.repo_id.replace('/', '--')} folder into the "
            "same place on any one node (the other nodes copy from it); or point HF_ENDPOINT at "
            "a reachable mirror.")


def read_config(meta_dir: Path) -> dict:
    return json.loads((Path(meta_dir) / "config.json").read_text())


class Reporter:
    """Progress of every node: bytes done / to fetch, rate, ETA and the
    source(s) in use, drawn with rich (or silent), and the bytes per source
    for the summary. Files already present count in the summary, not the bar,
    so rates and ETAs are about transfers only."""

    def __init__(self, console=None, show: bool = True):
        self._files: dict[str, dict[str, tuple[int, int, str]]] = {}
        self._lock = threading.Lock()
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._show, self._console = show, console
        self.names: dict[str, str] = {}  # node address -> name, to show "peer mac1"

    def _start(self) -> None:
        # Lazily: a question asked before the transfers must not fight a live display.
        if self._show and self._progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            self._progress = Progress(
                TextColumn("{task.fields[node]:<12}"), BarColumn(bar_width=24), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[source]}"),
                console=self._console or Console(stderr=True), transient=False)
            self._progress.start()

    def expect(self, node: str, fetch_bytes: int) -> None:
        """A bar for a node that has `fetch_bytes` to fetch (none when 0)."""
        if not fetch_bytes:
            return
        self._start()
        if self._progress is not None and node not in self._tasks:
            self._tasks[node] = self._progress.add_task("", total=fetch_bytes, node=node,
                                                        source="")

    def update(self, node: str, msg: pb.PrepareProgress) -> None:
        if not msg.path:
            return
        with self._lock:
            files = self._files.setdefault(node, {})
            before = files.get(msg.path)
            # A file fetched earlier in this run (the small files, first) stays
            # counted where it came from when the node later reports it present.
            if not (msg.source == "local" and before and before[2] != "local"):
                files[msg.path] = (msg.done_bytes, msg.total_bytes, msg.source)
            moving = [(d, t, s) for d, t, s in files.values() if s != "local"]
            done = sum(d for d, _, _ in moving)
            active = sorted({s for d, t, s in moving if d < t}) or sorted({s for *_, s in moving})
        if self._progress is not None and node in self._tasks:
            shown = [f"peer {self.names.get(a[5:], a[5:])}" if a.startswith("peer ") else a
                     for a in active]
            self._progress.update(self._tasks[node], completed=done,
                                  source=", ".join(shown)[:40])

    def by_source(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for node, files in self._files.items():
                for done, _, source in files.values():
                    kind = source or "?"
                    out.setdefault(node, {})[kind] = out.setdefault(node, {}).get(kind, 0) + done
        return out

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._show = False


def human(n: int) -> str:
    from rich.filesize import decimal
    return decimal(n)


def summary_lines(summary: Summary) -> list[str]:
    """Where every node's files came from, and the totals."""
    def label(source: str) -> str:
        if source == "local":
            return "already there"
        if source.startswith("peer "):
            address = source[5:]
            return f"from {summary.names.get(address, address)}"
        return f"from the {source}"

    lines = []
    for node, sources in sorted(summary.by_node.items()):
        parts = [f"{human(b)} {label(src)}" for src, b in sorted(sources.items()) if b]
        lines.append(f"node {node}: " + (", ".join(parts) or "nothing needed"))
    hub, peers = summary.bytes_from("hub"), summary.bytes_from("peer")
    rate = summary.transferred / max(summary.seconds, 1e-9)
    lines.append(
        f"files ready in {summary.seconds:.1f}s: "
        + (f"{human(hub)} from the hub (each file once)" if hub else "nothing from the hub")
        + ", " + (f"{human(peers)} between nodes" if peers else "nothing between nodes")
        + (f", {human(int(rate))}/s" if summary.transferred else ""))
    return lines
