"""`clusterd plan MODEL`: does the model fit these Macs, how would the layers be split, and
how fast would it run. Works offline on hypothetical nodes (--node) or on the nodes that are
up (--peer, or found by mDNS)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import click
from rich.console import Console
from rich.table import Table

from clusterd.cli.cluster_options import discovery_options, find_nodes, probe_node, with_errors
from clusterd.coordinator.placement import node_spec_from_info
from clusterd.discovery import distinct_nodes, node_from_info, parse_peer
from shard_planner.costs import DEFAULT_LINK, LINKS
from shard_planner.hardware import (DEFAULT_WIRED_FRACTION, NodeSpec, parse_node_arg)
from shard_planner.model_spec import (FROM_CONFIG, HeaderError, ModelSpec, Quantization,
                                      UnsupportedModel, model_spec_from_config,
                                      model_spec_from_dir, parse_dtype)
from shard_planner.planner import DOES_NOT_FIT, Plan, plan as make_plan
from shard_planner.report import plan_to_dict
from shard_planner.simulate import Anchor, Prediction, fmt_rate, matching_anchors, simulate

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


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def _print_human(p: Plan, pred: Prediction, source: dict[str, Any], anchors: list[Anchor]) -> None:
    # Never wrap a line: advice holds commands to copy.
    console = Console(width=max(Console().width, 110), soft_wrap=True)
    spec = p.model
    repo = source.get("repo")
    where = source.get("path") or (f"{repo}{'' if source.get('repo_verified') else ' (unverified)'}"
                                   if repo else source.get("repo_note", ""))
    console.print(f"[bold]{spec.name}[/] {spec.quant_label}" + (f"  ({where})" if where else ""),
                  highlight=False)
    console.print(f"{spec.num_layers} layers, {_gib(spec.total_weight_bytes)} GiB of weights "
                  f"(from {spec.source}), {spec.params / 1e9:.1f}B parameters, "
                  f"{spec.active_params / 1e9:.1f}B active, "
                  f"{spec.active_bytes_per_token / 1e9:.1f} GB read per token", highlight=False)
    console.print(f"context {p.context} x {p.sessions} session(s): KV cache "
                  f"{spec.kv_bytes(0, spec.num_layers, p.context, p.sessions) / 2**30:.2f} GiB")
    if p.stages:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("#", "node", "chip", "layers", "weights", "KV", "work", "need", "usable",
                    "GB/s", "ms/token"):
            table.add_column(col, justify="left" if col in ("node", "chip", "layers") else "right")
        for i, (s, sp) in enumerate(zip(p.stages, pred.stages)):
            usable = _gib(s.usable_bytes) + ("*" if s.wired_limit_mb else "")
            extra = " +emb" if s.start == 0 else ""
            extra += " +head" if s.end == spec.num_layers else ""
            table.add_row(
                str(i), s.node.name, s.node.chip or "-", f"{s.start}-{s.end}{extra}",
                _gib(s.weight_bytes), _gib(s.kv_bytes), _gib(s.workspace_bytes),
                _gib(s.need_bytes + s.headroom_bytes), usable,
                f"{s.node.bandwidth:g}" if s.node.bandwidth else "?",
                f"{sp.decode_ms:.1f}" if sp.decode_ms is not None else "-")
        console.print(table)
        console.print("  GiB; need = weights + KV + prefill workspace + reserve + headroom"
                      + ("; * usable after raising the wired limit" if any(
                          s.wired_limit_mb for s in p.stages) else ""))
    style = {"fits": "green", "fits-with-wired-limit": "yellow"}.get(p.verdict, "red")
    console.print(f"verdict: [bold {style}]{p.verdict}[/]")
    if pred.decode_tok_s is not None:
        console.print(f"predicted: decode {fmt_rate(pred.decode_tok_s)} tok/s, prefill "
                      f"{fmt_rate(pred.prefill_tok_s)} tok/s ({pred.prompt_tokens}-token prompt; "
                      f"{pred.hops} hops of {pred.link}, bandwidth at "
                      f"{pred.efficiency:.0%})")
    for a in anchors:
        console.print(f"published on this hardware: {a.system}, {a.model}: {a.decode} tok/s"
                      f" ({a.other}; {a.source})" + (f" [{a.caveat}]" if a.caveat else ""))
    for line in p.advice:
        console.print(line if line.startswith("  ") else f"- {line}", highlight=False)
    for note in p.notes:
        console.print(f"note: {note}", highlight=False)


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
              help="Concurrent sessions.")
@click.option("--link", default=DEFAULT_LINK, show_default=True,
              type=click.Choice(sorted(LINKS)), help="Link between nodes: the cost of a hop, in the split and the prediction.")
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
         link: str, wired_fraction: float, prefill_step_size: int, prompt_tokens: Optional[int],
         as_json: bool,
         interfaces: Sequence[str], peers: Sequence[str], no_mdns: bool,
         browse_timeout: float) -> None:
    """Will MODEL (a model folder, or a catalog name such as deepseek-r1) fit these nodes?
    Prints the split per stage, the verdict with advice, and the predicted speed."""
    from clusterd.models.catalog import CatalogError

    try:
        spec, source = _model_spec(model, quant)
    except (CatalogError, UnsupportedModel, HeaderError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if node_args and peers:
        raise click.UsageError("give either --node (hypothetical) or --peer (live), not both")
    if node_args:
        nodes: list[NodeSpec] = []
        for arg in node_args:
            try:
                nodes += parse_node_arg(arg, wired_fraction, start_index=len(nodes) + 1)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--node") from None
    else:
        nodes = _live_nodes(peers, interfaces, no_mdns, browse_timeout)
    p = make_plan(spec, nodes, context=context, sessions=sessions, link=link,
                  prefill_chunk=prefill_step_size)
    p = dataclasses.replace(p, advice=tuple(_with_repos(p.advice, source.get("catalog"))))
    pred = simulate(p, prompt_tokens=prompt_tokens)
    anchors = matching_anchors(nodes) if spec.model_type == "deepseek_v3" else []
    if as_json:
        out = plan_to_dict(p, pred, anchors)
        out["model"].update(source)
        click.echo(json.dumps(out, indent=2))
    else:
        _print_human(p, pred, source, anchors)
    if p.verdict == DOES_NOT_FIT:
        sys.exit(EXIT_DOES_NOT_FIT)
