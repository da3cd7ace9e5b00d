"""Getting the multi-token-prediction layer onto the node that runs the last stage.

mlx-community conversions lack the layer, so it comes from the original checkpoint
(catalog.original_repo: deepseek-ai/DeepSeek-R1, -R1-0528, -V3), and only the files of
it that hold model.layers.<N> tensors, as its model.safetensors.index.json says (for R1
a few of its 163 shards; the rest is never requested). Plus the converted model's
embedding file(s): the MTP layer embeds the next token and the last stage does not
otherwise hold the embedding. Everything goes through the cluster's own machinery:
ClusterFiles.metadata for the index, and the node's PrepareFiles RPC (store, then peers,
then the hub), so a file is pulled from the internet at most once per cluster.

The node converts the layer once (clusterd.models.mtp_convert.ensure_in_store) when it
loads the drafter; the originals stay in its store, so a second run transfers nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from clusterd.coordinator.cluster import Node
from clusterd.coordinator.prepare import (DEFAULT_ASK_BYTES, ClusterFiles, PrepareFailed,
                                          Reporter, human)
from clusterd.models.catalog import original_repo
from clusterd.models.files import FileCheckError, meta_files, read_weight_map
from clusterd.models.mtp_files import embedding_files, mtp_layer_index, original_shards
from clusterd.models.store import ModelRef, ModelStore
from clusterd.node.hub import Hub, HubError
from clusterd.speculative.drafts import MtpUnavailable
from clusterd.wire import clusterd_pb2 as pb


@dataclass(frozen=True)
class MtpFiles:
    """What the last node now holds for the MTP layer."""

    original: ModelRef  # the original checkpoint, in the node's store
    shards: tuple[str, ...]  # its files holding the MTP layer
    embedding: tuple[str, ...]  # the converted model's files holding the embedding


def fetch_mtp(main: ModelRef, main_meta: Path, last: Node, others: Sequence[Node] = (),
              reporter: Optional[Reporter] = None, *, store: Optional[ModelStore] = None,
              hub: Optional[Hub] = None, yes: bool = False, ask_above: int = DEFAULT_ASK_BYTES,
              confirm: Callable[[str], bool] = lambda text: False) -> MtpFiles:
    """Make `last` hold the MTP layer's original files and the embedding of `main`
    (whose config, tokenizer and index are in main_meta on this machine). `others` may
    serve files they hold. Asks `confirm` before pulling more than ask_above bytes from
    the hub, unless yes. MtpUnavailable, with the reason, when it cannot: the caller
    drafts by prompt lookup instead."""
    repo = original_repo(main.repo_id)
    if repo is None:
        raise MtpUnavailable(f"no original checkpoint is known for {main.repo_id}: its "
                             "multi-token-prediction layer cannot be fetched")
    original = ModelRef(repo)
    reporter = reporter or Reporter(show=False)
    nodes = [last, *others]
    files = ClusterFiles(original, nodes, reporter, store=store, hub=hub)
    try:
        meta_dir = files.metadata()
        config = json.loads((meta_dir / "config.json").read_text())
        shards = original_shards(read_weight_map(meta_dir), mtp_layer_index(config))
        embedding = embedding_files(read_weight_map(main_meta))
    except (PrepareFailed, FileCheckError, OSError, ValueError) as e:
        raise MtpUnavailable(f"the index of {repo} cannot be had: {e}") from None
    wanted = meta_files(p.name for p in meta_dir.iterdir()) + shards
    _ask(original, shards, nodes, hub or Hub(), yes, ask_above, confirm)
    addresses = [n.peer.address for n in others]
    _prepare(last, original, wanted, addresses, reporter)
    _prepare(last, main, embedding, addresses, reporter)
    reporter.close()
    return MtpFiles(original, tuple(shards), tuple(embedding))


def _ask(original: ModelRef, shards: list[str], nodes: Sequence[Node], hub: Hub, yes: bool,
         ask_above: int, confirm: Callable[[str], bool]) -> None:
    held = set()
    for n in nodes:
        held |= {f.path for f in n.peer.list_files(str(original), shards)}
    missing = [p for p in shards if p not in held]
    if not missing or yes:
        return
    try:
        listing = hub.listing(original.repo_id, original.revision)
    except HubError as e:
        raise MtpUnavailable(f"{', '.join(missing[:3])} of {original} are on no node and the hub "
                             f"cannot be used: {e}") from None
    absent = [p for p in missing if p not in listing.files]
    if absent:
        raise MtpUnavailable(f"{original} on the hub has no {', '.join(absent[:3])}")
    size = sum(listing.files[p].size for p in missing)
    if size > ask_above and not confirm(
            f"Download {human(size)} of {original} from the hub for the multi-token-prediction "
            f"layer ({len(missing)} files, once for the whole cluster)?"):
        raise MtpUnavailable("not downloading the multi-token-prediction layer; pass --yes to "
                             "download without asking")


def _prepare(node: Node, ref: ModelRef, paths: list[str], peers: list[str],
             reporter: Reporter) -> None:
    last = None
    for msg in node.peer.prepare_files(pb.PrepareFilesRequest(
            model=str(ref), paths=paths, peer_addresses=peers, allow_hub=True)):
        reporter.update(node.peer.name, msg)
        last = msg
    if last is None or not last.finished:
        why = last.error if last is not None and last.error else "it stopped without finishing"
        raise MtpUnavailable(f"node {node.peer.name} could not get the multi-token-prediction "
                             f"files of {ref}: {why}")
