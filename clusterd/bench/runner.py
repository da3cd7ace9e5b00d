"""`clusterd bench`: every layout and both baselines loaded side by side, then
measured in interleaved rounds (the order rotates each round), so the load of a
shared machine falls on all of them alike."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from clusterd.bench.baselines import MlxLm, MlxRing
from clusterd.bench.hop import measure_hop
from clusterd.bench.layouts import ClusterdLayout, LayoutSpec, layout_specs
from clusterd.bench.runs import RunResult, Subject
from clusterd.bench.stats import (code_version, latency_summary, load_average, machine,
                                  now_iso, summary)
from clusterd.local_cluster import LocalCluster
from clusterd.models.stage import read_config


@dataclass
class BenchConfig:
    model: Optional[Path] = None  # None: the synthetic DeepSeek-V3 `preset`
    preset: str = "bench"
    nodes: list[int] = field(default_factory=lambda: [1, 2, 3])
    split: str = "even"
    peers: list[str] = field(default_factory=list)  # running nodes; empty: local daemons
    prompt_tokens: int = 64
    new_tokens: int = 64
    prefill_step_size: int = 2048
    repetitions: int = 3
    warmup: int = 1
    mlx_lm: bool = True
    ring: bool = True
    ring_via_launcher: bool = False  # run mlx.launch itself (its I/O relay busy-polls)
    hop: bool = True
    command: str = "clusterd bench"


@dataclass
class _Entry:
    factory: Callable[[], Subject]
    name: str
    subject: Optional[Subject] = None
    runs: list[RunResult] = field(default_factory=list)
    memory: list = field(default_factory=list)
    error: str = ""
    closed: bool = False


def resolve_model(cfg: BenchConfig, say: Callable[[str], None]) -> Path:
    if cfg.model is not None:
        return Path(cfg.model).resolve()
    from clusterd.models.synthetic import build_synthetic_model

    say(f"model: synthetic deepseek_v3 '{cfg.preset}' (built once, then cached)")
    return build_synthetic_model("deepseek_v3", cfg.preset, 0)


def make_prompt(n: int, vocab: int) -> list[int]:
    # Spread over the vocabulary, never the BOS/EOS ids 0 and 1.
    return [(i * 37 + 11) % (vocab - 2) + 2 for i in range(n)]


def run_bench(cfg: BenchConfig, console: Console, workdir: Optional[Path] = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="clusterd-bench-"))
    say = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    load_before = load_average()
    model = resolve_model(cfg, say)
    config = read_config(model)
    num_layers = int(config["num_hidden_layers"])
    specs = layout_specs(cfg.nodes, cfg.split, num_layers)
    prompt = make_prompt(cfg.prompt_tokens, int(config["vocab_size"]))
    result: dict = {
        "command": cfg.command,
        "date": now_iso(),
        "machine": machine(),
        "code": code_version(),
        "model": {"name": model.name, "path": str(model), "model_type": config.get("model_type"),
                  "num_layers": num_layers, "hidden_size": config.get("hidden_size"),
                  "weight_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))},
        "workload": {"prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                     "prefill_step_size": cfg.prefill_step_size,
                     "repetitions": cfg.repetitions, "warmup": cfg.warmup,
                     "sampling": "greedy",
                     "nodes": "remote --peer" if cfg.peers else "local daemons"},
        "baseline": "mlx-lm, 1 process",
        "subjects": [], "skipped": [], "hop": None,
    }
    say(f"load average before: {load_before}")
    clusters: list[LocalCluster] = []
    groups = _groups(cfg, model, specs, workdir, say, clusters)
    mlx_entry = groups[0][0] if cfg.mlx_lm else None
    shared = {id(e) for e in groups[0]} if len(groups) > 1 else set()
    for g in groups[1:]:
        shared &= {id(e) for e in g}
    try:
        for group in groups:
            _measure_group(group, cfg, prompt, console, result)
            if len(groups) > 1:  # running nodes: free them for the next layout
                _close([e for e in group if id(e) not in shared])
    finally:
        _close([e for g in groups for e in g])
        for c in clusters:
            c.stop()
    _summarize(groups, mlx_entry, result)
    if cfg.hop:
        with _progress(console) as p:
            task = p.add_task("hop", total=None)
            result["hop"] = measure_hop(
                workdir, progress=lambda t: p.update(task, description=f"hop: {t}"))
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    result["code_after"] = code_version()  # differs from "code" if files changed meanwhile
    return result


def _close(entries: list[_Entry]) -> None:
    for e in entries:
        if e.subject is not None and not e.closed:
            e.closed = True
            e.subject.close()


def _groups(cfg: BenchConfig, model: Path, specs: list[LayoutSpec], workdir: Path,
            say, clusters: list[LocalCluster]) -> list[list[_Entry]]:
    """Subjects that are loaded at the same time. Local daemons: one group, a
    daemon per stage of every layout. Running nodes (--peer) hold one shard
    each, so each layout is its own group (with the baselines)."""
    base: list[_Entry] = []
    if cfg.mlx_lm:
        base.append(_Entry(lambda: MlxLm(model, workdir), "mlx-lm, 1 process"))
    if cfg.peers:
        need = max(s.nodes for s in specs)
        if len(cfg.peers) < need:
            raise ValueError(f"the largest layout needs {need} nodes; "
                             f"{len(cfg.peers)} --peer given")
        return [base + _layout_entries(cfg, model, spec, cfg.peers, workdir) for spec in specs]
    total = sum(s.nodes for s in specs)
    say(f"starting {total} local daemons")
    cluster = LocalCluster(total, workdir=workdir / "nodes")
    cluster.__enter__()
    clusters.append(cluster)  # the caller stops it
    group = list(base)
    at = 0
    for spec in specs:
        group += _layout_entries(cfg, model, spec, cluster.addresses[at:at + spec.nodes], workdir)
        at += spec.nodes
    return [group]


def _layout_entries(cfg: BenchConfig, model: Path, spec: LayoutSpec, addresses: list[str],
                    workdir: Path) -> list[_Entry]:
    layout = _Entry(lambda: ClusterdLayout(model, addresses, spec), spec.label)
    if not cfg.ring or spec.nodes < 2:
        return [layout]
    # mlx-lm's ring with the layout's own stages, known once the layout loaded
    # (a planned split is decided then); the group loads the layout first.
    def ring() -> MlxRing:
        if layout.subject is None:
            raise RuntimeError(f"{spec.label} did not load, so its split is unknown")
        split = layout.subject.info.split
        if len(split) < 2:
            raise RuntimeError("the layout runs on one node: no pipeline to compare")
        return MlxRing(model, split, workdir, via_launcher=cfg.ring_via_launcher)
    return [layout, _Entry(ring, f"mlx-lm ring, {spec.nodes} processes")]


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, transient=False)


def _measure_group(group: list[_Entry], cfg: BenchConfig, prompt: list[int], console: Console,
                   result: dict) -> None:
    with _progress(console) as p:
        task = p.add_task("loading", total=len(group))
        for e in group:
            if e.subject is None and not e.error:
                p.update(task, description=f"loading {e.name}")
                try:
                    e.subject = e.factory()
                except Exception as ex:  # one failed subject must not end the run
                    e.error = f"{type(ex).__name__}: {ex}"
                    result["skipped"].append({"name": e.name, "reason": e.error})
            p.advance(task)
        live = [e for e in group if e.subject is not None]
        total = len(live) * (cfg.warmup + cfg.repetitions)
        task = p.add_task("measuring", total=total)
        for r in range(cfg.warmup + cfg.repetitions):
            warm = r < cfg.warmup
            # Rotate the order each round so no subject always runs first or last.
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for e in order:
                label = "warm-up" if warm else f"round {r - cfg.warmup + 1}/{cfg.repetitions}"
                p.update(task, description=f"{label}: {e.name}")
                if not e.error:
                    try:
                        # Two tokens first, unmeasured: an idle channel may have been closed
                        # meanwhile (keepalive), and a reconnect belongs to no layout's TTFT.
                        e.subject.generate(prompt[:1], 2, cfg.prefill_step_size)
                        run = e.subject.generate(prompt, cfg.new_tokens, cfg.prefill_step_size)
                        if not warm:
                            e.runs.append(run)
                    except Exception as ex:
                        e.error = f"{type(ex).__name__}: {ex}"
                p.advance(task)
        for e in live:
            e.memory = e.subject.memory() if not e.error else []


def _summarize(groups: list[list[_Entry]], mlx_entry: Optional[_Entry], result: dict) -> None:
    entries: list[_Entry] = []
    for g in groups:
        for e in g:
            if e not in entries:
                entries.append(e)
    base = _metrics(mlx_entry) if mlx_entry and mlx_entry.runs else None
    ref_tokens = mlx_entry.runs[0].tokens if mlx_entry and mlx_entry.runs else None
    one_node = next((e for e in entries if e.subject is not None and
                     isinstance(e.subject, ClusterdLayout) and e.subject.spec.nodes == 1), None)
    one_step = (statistics.median([x for r in one_node.runs for x in r.intervals])
                if one_node and one_node.runs else None)
    for e in entries:
        if e.subject is None:
            continue
        info = e.subject.info
        m = _metrics(e) if e.runs else {}
        s = {"name": info.name, "kind": info.kind, "stages": info.stages, "split": info.split,
             "how": info.note, "error": e.error, **m,
             "memory": [{"name": x.name, "layers": list(x.layers), "rss_bytes": x.rss_bytes,
                         "held_bytes": x.held_bytes} for x in e.memory],
             "hop_in_pipeline": None,
             "tokens_match_mlx_lm": (all(r.tokens == ref_tokens for r in e.runs)
                                     if ref_tokens is not None and e.runs else None)}
        if base and m:
            s["decode_vs_mlx_lm"] = m["decode_tok_s"]["median"] / base["decode_tok_s"]["median"]
            s["prefill_vs_mlx_lm"] = m["prefill_tok_s"]["median"] / base["prefill_tok_s"]["median"]
            # A time: below 1 means the first token came sooner than mlx-lm's.
            s["ttft_vs_mlx_lm"] = m["ttft_s"]["median"] / base["ttft_s"]["median"]
        if isinstance(e.subject, ClusterdLayout) and one_step and info.stages > 1 and e.runs:
            # Each token's extra time over the 1-node layout's median step, per hop
            # (a ring of k stages has k hops per token): what the hops cost.
            extra = [(x - one_step) / info.stages for r in e.runs for x in r.intervals]
            s["hop_in_pipeline"] = latency_summary(extra)
        result["subjects"].append(s)


def _metrics(e: _Entry) -> dict:
    return {
        "ttft_s": summary([r.ttft_s for r in e.runs]),
        "prefill_tok_s": summary([r.prefill_tok_s for r in e.runs]),
        "decode_tok_s": summary([r.decode_tok_s for r in e.runs]),
        "decode_interval": latency_summary([x for r in e.runs for x in r.intervals]),
    }


def default_name(result: dict) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"bench-{result['model']['name']}-{stamp}"
