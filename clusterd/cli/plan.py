"""`clusterd plan MODEL`: does the model fit these Macs, how would the layers be split, and
how fast would it run. Works offline on hypothetical nodes (--node) or on the nodes that are
up (--peer, or found by mDNS). With --also, extra models are placed beside it."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from clusterd.cli.cluster_options import discovery_options, find_nodes, probe_node, with_errors
from clusterd.cli.plan_output import print_multi, print_plan
from clusterd.coordinator.placement import node_spec_from_info
from clusterd.discovery import distinct_nodes, node_from_info, parse_peer
from shard_planner.costs import DEFAULT_LINK, LINKS
from shard_planner.hardware import (DEFAULT_WIRED_FRACTION, NodeSpec, parse_node_arg)
from shard_planner.links import load_links
from shard_planner.model_spec import (FROM_CONFIG, HeaderError, ModelSpec, Quantization,
                                      UnsupportedModel, model_spec_from_config,
                                      model_spec_from_dir, parse_dtype)
from shard_planner.multi import AlsoModel, plan_many
from shard_planner.planner import DOES_NOT_FIT, Plan
from shard_planner.plans import DRAFT_MTP
from shard_planner.report import multi_plan_to_dict, plan_to_dict
from shard_planner.serving import MTP_ACCEPTANCE, ServingPrediction, predict_serving
from shard_planner.simulate import matching_anchors, simulate

# Exit status when the model does not fit, so scripts can test `clusterd plan ... && ...`.
EXIT_DOES_NOT_FIT = 3


def _model_spec(model: str, quant: Optional[str]) -> tuple[ModelSpec, dict[str, Any]]:
    """A model folder or a catalog name -> (accounting, facts about where it comes from)."""
    from clusterd.models import catalog

    path = Path(model).expanduser()
    if path.is_dir():
        q: Any = FROM_CONFIG
        dtype = None
        if quant:
            dtype = parse_dtype(quant)
            q = None if dtype else Quantization.parse(quant)
        return model_spec_from_dir(path, q, dtype=dtype), {"path": str(path.resolve())}
    r = catalog.resolve(model, quant)
    spec = model_spec_from_config(r.config, r.quantization, dtype=r.dtype, name=r.name)
    return spec, {"catalog": r.name, "repo": r.repo, "repo_verified": r.verified,
                  "repo_note": r.note}


def _with_repos(advice: Sequence[str], catalog_name: Optional[str]) -> list[str]:
    """Say which suggested quantization is published, for a catalog model."""
    from clusterd.models import catalog

    if not catalog_name:
        return list(advice)
    out = []
    for line in advice:
        m = re.search(r"--quant (\S+)", line)
        if m:
            r = catalog.resolve(catalog_name, m.group(1))
            q = r.quantization
            if r.repo and q is not None and q.label == m.group(1):
                line += f" (published: {r.repo})"
            elif q is not None:
                line += (f" (not published; mlx_lm.convert -q --q-bits {q.bits} "
                         f"--q-group-size {q.group_size} makes it)")
        out.append(line)
    return out


def _live_nodes(peers: Sequence[str], interfaces: Sequence[str], no_mdns: bool,
                browse_timeout: float) -> list[NodeSpec]:
    from clusterd.coordinator.peers import PeerError

    if peers:  # in the order given: that is the ring order
        infos = []
        for address in peers:
            try:
                infos.append(probe_node(address))
            except PeerError as e:
                raise click.ClickException(str(e)) from None
        problem = distinct_nodes([node_from_info(i, *parse_peer(a)) for a, i in zip(peers, infos)])
        if problem:  # the rule of every command (clusterd.discovery.distinct_nodes)
            raise click.ClickException(problem)
        return [node_spec_from_info(i, a) for a, i in zip(peers, infos)]
    result = find_nodes(interfaces=interfaces, peers=(), no_mdns=no_mdns,
                        browse_timeout=browse_timeout)
    for line in result.problems():
        click.echo(f"skipping: {line}", err=True)
    reports = [r for r in result.reports if r.usable and r.info is not None]
    if not reports:
        raise click.ClickException(
            "no nodes are up: start `clusterd up` on each Mac (or pass --peer HOST:PORT), or "
            "plan for hypothetical Macs with --node CHIP:RAM_GB[xCOUNT], e.g. --node m2-ultra:192x3")
    return [node_spec_from_info(r.info, r.node.address) for r in reports]


def _spec_or_error(model: str, quant: Optional[str]) -> tuple[ModelSpec, dict[str, Any]]:
    from clusterd.models.catalog import CatalogError

    try:
        return _model_spec(model, quant)
    except (CatalogError, UnsupportedModel, HeaderError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


def _serving(p: Plan, sessions: int, acceptance: float) -> dict[str, Optional[ServingPrediction]]:
    """The predictions beyond one stream: N sessions at once, and MTP drafts when planned."""
    out: dict[str, Optional[ServingPrediction]] = {}
    if not p.stages:
        return out
    mtp = p.draft == DRAFT_MTP
    if mtp:
        out["mtp"] = predict_serving(p, 1, draft_tokens=1, acceptance=acceptance)
    if sessions > 1:
        out["sessions"] = predict_serving(p, sessions)
        if mtp:
            out["sessions+mtp"] = predict_serving(p, sessions, draft_tokens=1,
                                                  acceptance=acceptance)
    return out


def _nodes(node_args: Sequence[str], wired_fraction: float, peers: Sequence[str],
           interfaces: Sequence[str], no_mdns: bool, browse_timeout: float) -> list[NodeSpec]:
    if node_args and peers:
        raise click.UsageError("give either --node (hypothetical) or --peer (live), not both")
    if not node_args:
        return _live_nodes(peers, interfaces, no_mdns, browse_timeout)
    nodes: list[NodeSpec] = []
    for arg in node_args:
        try:
            nodes += parse_node_arg(arg, wired_fraction, start_index=len(nodes) + 1)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--node") from None
    return nodes


@click.command()
@click.argument("model")
@click.option("--quant", default=None, metavar="Q",
              help="3bit, 4bit, 8bit, optionally with a group size (4bit-g32), or bf16. "
                   "Default: a folder's own quantization; 4bit for a catalog name.")
@click.option("--node", "node_args", multiple=True, metavar="CHIP:RAM_GB[xCOUNT]",
              help="A hypothetical node, e.g. m2-ultra:192x3 (repeatable; the order is the ring "
                   "order). Without --node, the nodes that are up.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1),
              help="Tokens of context per session to reserve KV cache for.")
@click.option("--sessions", default=1, show_default=True, type=click.IntRange(1),
              help="Concurrent sessions: KV room for each, and the predicted speed of all at once.")
@click.option("--prompt-cache", "prompt_cache", default=None, type=click.IntRange(0),
              metavar="TOKENS",
              help="Tokens of finished sessions' KV each stage keeps for reuse [default: context].")
@click.option("--draft", default=None, type=click.Choice([DRAFT_MTP]),
              help="Plan drafts for speculative decoding: mtp places R1's multi-token-prediction "
                   "layer on the last stage when there is room.")
@click.option("--acceptance", default=MTP_ACCEPTANCE, show_default=True,
              type=click.FloatRange(0, 1), help="Share of MTP drafts kept, for the prediction.")
@click.option("--also", "also_args", multiple=True, metavar="MODEL[@NODE]",
              help="Another model to place on the same nodes (repeatable), where there is room "
                   "or on NODE (a node name, its 1-based position, or HOST:PORT of a live "
                   "node).")
@click.option("--link", default=DEFAULT_LINK, show_default=True,
              type=click.Choice(sorted(LINKS)),
              help="Link between nodes: the cost of a hop, in the split and the prediction.")
@click.option("--links", "links_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Measured links (JSON, as `clusterd doctor` writes): used for the hops they "
                   "cover, --link for the rest.")
@click.option("--wired-fraction", default=DEFAULT_WIRED_FRACTION, show_default=True,
              type=click.FloatRange(0.1, 1.0),
              help="GPU wired limit of hypothetical nodes, as a share of RAM.")
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1),
              help="Tokens per prefill step (as `clusterd run`); prefill memory grows with it.")
@click.option("--prompt-tokens", default=None, type=click.IntRange(1),
              help="Prompt length for the prefill prediction [default: context, at most 8192].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@discovery_options
@with_errors
def plan(model: str, quant: Optional[str], node_args: Sequence[str], context: int, sessions: int,
         prompt_cache: Optional[int], draft: Optional[str], acceptance: float,
         also_args: Sequence[str], link: str, links_file: Optional[Path], wired_fraction: float,
         prefill_step_size: int, prompt_tokens: Optional[int], as_json: bool,
         interfaces: Sequence[str], peers: Sequence[str], no_mdns: bool,
         browse_timeout: float) -> None:
    """Will MODEL (a model folder, or a catalog name such as deepseek-r1) fit these nodes?
    Prints the split per stage, the verdict with advice, and the predicted speed."""
    spec, source = _spec_or_error(model, quant)
    nodes = _nodes(node_args, wired_fraction, peers, interfaces, no_mdns, browse_timeout)
    links = None
    if links_file is not None:
        try:
            links = load_links(links_file).pairs
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(str(e), param_hint="--links") from None
    args: dict[str, Any] = dict(link=link, prefill_chunk=prefill_step_size,
                                prompt_cache_tokens=prompt_cache, draft=draft, links=links)
    if also_args:
        _plan_many(spec, source, nodes, also_args, context, sessions, args, acceptance,
                   prompt_tokens, as_json)
        return
    p = _with_catalog_advice(_plan_one(spec, nodes, context, sessions, args), source)
    pred = simulate(p, prompt_tokens=prompt_tokens)
    serving = _serving(p, sessions, acceptance)
    anchors = matching_anchors(nodes) if spec.model_type == "deepseek_v3" else []
    if as_json:
        out = plan_to_dict(p, pred, anchors, serving)
        out["model"].update(source)
        click.echo(json.dumps(out, indent=2))
    else:
        print_plan(p, pred, source, anchors, serving)
    if p.verdict == DOES_NOT_FIT:
        sys.exit(EXIT_DOES_NOT_FIT)


def _plan_one(spec: ModelSpec, nodes: Sequence[NodeSpec], context: int, sessions: int,
              args: dict[str, Any]) -> Plan:
    from shard_planner.planner import plan as make_plan

    try:
        return make_plan(spec, nodes, context=context, sessions=sessions, **args)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _with_catalog_advice(p: Plan, source: dict[str, Any]) -> Plan:
    return dataclasses.replace(p, advice=tuple(_with_repos(p.advice, source.get("catalog"))))


def _plan_many(spec: ModelSpec, source: dict[str, Any], nodes: Sequence[NodeSpec],
               also_args: Sequence[str], context: int, sessions: int, args: dict[str, Any],
               acceptance: float, prompt_tokens: Optional[int], as_json: bool) -> None:
    also, sources = [], [source]
    for text in also_args:
        name, at, node = text.rpartition("@") if "@" in text else (text, "", "")
        if at and not node:
            raise click.BadParameter(f"{text!r}: give a node after @", param_hint="--also")
        extra, extra_source = _spec_or_error(name, None)
        # A live node may be named by its address too, as `serve --also` takes it.
        node = next((nd.name for nd in nodes if node and nd.address == node), node)
        also.append(AlsoModel(extra, node=node or None))
        sources.append(extra_source)
    try:
        mp = plan_many(spec, nodes, also, context, sessions, **args)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--also") from None
    plans = [_with_catalog_advice(m.plan, src) for m, src in zip(mp.models, sources)]
    preds = [simulate(p, prompt_tokens=prompt_tokens) for p in plans]
    serving = [_serving(p, sessions, acceptance) for p in plans]
    mp = dataclasses.replace(mp, models=tuple(
        dataclasses.replace(m, plan=p) for m, p in zip(mp.models, plans)))
    if as_json:
        dicts = [plan_to_dict(p, pred, None, sv) for p, pred, sv in zip(plans, preds, serving)]
        for d, src in zip(dicts, sources):
            d["model"].update(src)
        click.echo(json.dumps(multi_plan_to_dict(mp, dicts), indent=2))
    else:
        print_multi(mp, preds, sources, serving)
    if mp.verdict == DOES_NOT_FIT:
        sys.exit(EXIT_DOES_NOT_FIT)
