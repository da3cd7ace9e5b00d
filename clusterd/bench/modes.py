"""What the serving benchmarks share (`clusterd bench --concurrency`,
`--interleave-prompt`, `--cache-turns`, `--trip-tokens`): their settings,
the result file's header, the daemons the layouts run on, mlx-lm in one
process as the stream-level subjects, interleaved rounds with progress, and
the teacher-forcing check of every stream against single-process mlx-lm."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from clusterd.bench.baselines import MlxLm
from clusterd.bench.engine_layout import StreamRun
from clusterd.bench.layouts import LayoutSpec, layout_specs
from clusterd.bench.runner import resolve_model
from clusterd.bench.runs import SubjectInfo
from clusterd.bench.stats import code_version, load_average, machine, now_iso, percentile
from clusterd.local_cluster import LocalCluster
from clusterd.models.stage import read_config

TOLERANCE = 1e-4  # teacher forcing: a log-probability gap this small is a tie
CHECK_BATCH = 32  # (prompt, tokens) pairs per teacher-forcing request


@dataclass(frozen=True)
class ServingConfig:
    model: Optional[Path] = None  # None: the synthetic DeepSeek-V3 `preset`
    preset: str = "bench"
    nodes: tuple[int, ...] = (1, 3)
    split: str = "even"
    peers: tuple[str, ...] = ()  # running nodes; empty: local daemons
    prompt_tokens: int = 64  # streams' base prompt length; the trips' context
    new_tokens: int = 64
    prefill_step_size: int = 2048
    repetitions: int = 3
    warmup: int = 1
    mlx_lm: bool = True
    command: str = "clusterd bench"
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    streams: int = 4  # decoding while the long prompt arrives
    long_prompt: int = 2000  # --interleave-prompt
    first_turn: int = 2000  # --cache-turns
    turn_gap_s: float = 0.0  # between a chat's turns (0: the next the moment one ends)
    trip_tokens: tuple[int, ...] = (1, 2, 3, 4)
    trips: int = 30  # trips per width per round


def parse_counts(text: str, flag: str, low: int = 1) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), sorted, each at least `low`; a clear error otherwise."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give whole numbers separated by commas") from None
    if not values or values[0] < low:
        raise ValueError(f"{flag} {text!r}: every value must be at least {low}")
    return tuple(values)


def distinct_prompt(length: int, vocab: int, salt: int) -> list[int]:
    """A prompt no other salt shares a prefix with (so no prompt cache helps
    it), never the BOS/EOS ids 0 and 1."""
    span = vocab - 2
    return [(i * 37 + 11 + salt * 7919 + (salt * 131 if i == 0 else 0)) % span + 2
            for i in range(length)]


def ordered(subjects: list[dict]) -> list[dict]:
    """The table's order: the layouts by stage count, then the baselines."""
    return sorted(subjects, key=lambda s: (s["kind"] != "clusterd", s["stages"]))


def rotate(items: Sequence, r: int) -> list:
    """The round's order: each round starts one further, so none always runs first."""
    if not items:
        return []
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


class Setup:
    """The run's model, layouts and result header."""

    def __init__(self, cfg: ServingConfig, mode: str, console: Console,
                 workdir: Optional[Path] = None):
        self.cfg, self.mode, self.console = cfg, mode, console
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="clusterd-bench-"))
        self.load_before = load_average()
        self.model_dir = resolve_model(self.cfg, self.say)
        self.config = read_config(self.model_dir)
        self.vocab = int(self.config["vocab_size"])
        self.specs: list[LayoutSpec] = layout_specs(self.cfg.nodes, self.cfg.split,
                                                    int(self.config["num_hidden_layers"]))

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]")

    def header(self, workload: dict) -> dict:
        c = self.config
        return {
            "mode": self.mode, "command": self.cfg.command, "date": now_iso(),
            "machine": machine(), "code": code_version(),
            "model": {"name": self.model_dir.name, "path": str(self.model_dir),
                      "model_type": c.get("model_type"),
                      "num_layers": int(c["num_hidden_layers"]),
                      "hidden_size": c.get("hidden_size"),
                      "weight_bytes": sum(f.stat().st_size
                                          for f in self.model_dir.glob("*.safetensors"))},
            "workload": {**workload, "repetitions": self.cfg.repetitions,
                         "warmup": self.cfg.warmup, "sampling": "greedy, no stop ids",
                         "nodes": "remote --peer" if self.cfg.peers else "local daemons"},
            "load_average_before": self.load_before,
            "subjects": [], "skipped": [],
        }

    @staticmethod
    def finish(result: dict) -> dict:
        result["load_average_after"] = load_average()
        result["code_after"] = code_version()  # differs from "code" if files changed meanwhile
        return result

    @contextlib.contextmanager
    def groups(self) -> Iterator[list[list[tuple[LayoutSpec, list[str]]]]]:
        """Layouts loaded at the same time, with their nodes' addresses. Local
        daemons: one group, a daemon per stage of every layout. Running nodes
        (--peer): one layout at a time, on the first nodes given."""
        if self.cfg.peers:
            need = max(s.nodes for s in self.specs)
            if len(self.cfg.peers) < need:
                raise ValueError(f"the largest layout needs {need} nodes; "
                                 f"{len(self.cfg.peers)} --peer given")
            yield [[(s, list(self.cfg.peers[:s.nodes]))] for s in self.specs]
            return
        total = sum(s.nodes for s in self.specs)
        self.say(f"starting {total} local daemons")
        with LocalCluster(total, workdir=self.workdir / "nodes") as cluster:
            group, at = [], 0
            for s in self.specs:
                group.append((s, cluster.addresses[at:at + s.nodes]))
                at += s.nodes
            yield [group]

    def mlx_lm(self) -> Optional[MlxLm]:
        if not self.cfg.mlx_lm:
            return None
        self.say("starting single-process mlx-lm")
        return MlxLm(self.model_dir, self.workdir, timeout=3600.0)

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=self.console, transient=False)


def measure_layouts(setup: "Setup", factory, result: dict, measure) -> None:
    """Each group of layouts loaded in turn (`factory(spec, addresses)` -> subjects),
    `measure(layouts)`, then closed, whatever happened."""
    with setup.groups() as groups:
        for group in groups:
            layouts = open_layouts(group, factory, result, setup.say)
            try:
                measure(layouts)
            finally:
                for lay in layouts:
                    lay.close()


def open_layouts(group, factory, result: dict, say) -> list:
    """Every layout of a group loaded; one that fails is skipped, named in the result."""
    out = []
    for spec, addresses in group:
        try:
            out.extend(factory(spec, addresses))
        except Exception as e:  # one failed layout must not end the run
            say(f"{spec.label} did not load: {e}")
            result["skipped"].append({"name": spec.label, "reason": f"{type(e).__name__}: {e}"})
    return out


class MlxBatched:
    """mlx-lm's BatchGenerator in the baseline process, as a stream-level subject."""

    def __init__(self, mlx: MlxLm, prefill_step_size: int):
        self.mlx, self.step = mlx, prefill_step_size
        self.info = SubjectInfo("mlx-lm batched, 1 process", "mlx-lm-batched", 1,
                                list(mlx.info.split))

    def run_streams(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[StreamRun]:
        res = self.mlx.op("batch", prompts=[list(p) for p in prompts], max_tokens=max_tokens,
                          prefill_step_size=self.step)
        return [stream_run(p, s) for p, s in zip(prompts, res["streams"])]


class MlxSingle:
    """mlx-lm's generate_step, one stream (the reference for one stream)."""

    def __init__(self, mlx: MlxLm, prefill_step_size: int):
        self.mlx, self.step = mlx, prefill_step_size
        self.info = mlx.info

    def run_streams(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[StreamRun]:
        if len(prompts) != 1:
            raise ValueError("single-process mlx-lm runs one stream at a time")
        r = self.mlx.generate(prompts[0], max_tokens, self.step)
        return [StreamRun(tuple(prompts[0]), list(r.tokens), list(r.token_times))]


def stream_run(prompt: Sequence[int], s: dict) -> StreamRun:
    return StreamRun(tuple(prompt), list(s["tokens"]), list(s["token_times"]),
                     submitted=float(s.get("submitted", 0.0)))


def teacher_force(mlx: Optional[MlxLm], pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  progress: Callable[[str], None] = lambda t: None) -> Optional[list[int]]:
    """Misses of each (prompt, tokens) against mlx-lm fed the same prefix
    (clusterd.reference's rule); None without mlx-lm. Equal pairs are checked once."""
    if mlx is None:
        return None
    keys = [(tuple(p), tuple(t)) for p, t in pairs]
    unique = [k for k in dict.fromkeys(keys) if k[1]]
    found: dict = {}
    for i in range(0, len(unique), CHECK_BATCH):
        part = unique[i:i + CHECK_BATCH]
        progress(f"checking tokens against mlx-lm ({i + len(part)}/{len(unique)})")
        res = mlx.op("teacher_force", items=[[list(p), list(t)] for p, t in part],
                     tolerance=TOLERANCE)
        found.update({k: len(m) for k, m in zip(part, res["misses"])})
    return [found.get(k, 0) for k in keys]


def ms_summary(seconds: Sequence[float]) -> dict:
    """p50 / p99 / max in milliseconds."""
    return {"p50_ms": 1e3 * percentile(seconds, 50), "p99_ms": 1e3 * percentile(seconds, 99),
            "max_ms": 1e3 * max(seconds) if seconds else float("nan"), "n": len(seconds)}


def ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """median(a) / median(b) of two summaries, or None."""
    x, y = (a or {}).get("median"), (b or {}).get("median")
    return x / y if x is not None and y else None

