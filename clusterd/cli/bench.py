"""`clusterd bench [MODEL]`: tokens/sec per cluster layout against mlx-lm in
the same run, one decode hop against plain TCP, (--predict) the planner's
forecasts for real Mac layouts next to published results, and the serving
engine's modes: --concurrency, --interleave-prompt, --cache-turns and
--trip-tokens."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _command() -> str:
    """The exact command, for the result files."""
    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1:]
    return "clusterd bench " + shlex.join(argv) if argv else "clusterd bench"


@click.command()
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path))
@click.option("--preset", default="bench", show_default=True,
              type=click.Choice(["tiny", "small", "bench"]),
              help="Synthetic DeepSeek-V3 model to use when MODEL is not given.")
@click.option("--nodes", default=None, metavar="N,N,...",
              help="Layouts: how many nodes each uses [default: 1,2,3; 1,3 for the serving "
                   "modes].")
@click.option("--split", default="even", show_default=True, metavar="even|planned|N,N,...",
              help="Layers per node: even, the shard planner's, or given counts (one layout).")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="Use running nodes (repeat, ring order); without it, local daemons are started.")
@click.option("--prompt-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Prompt length: TTFT and prefill tok/s are measured at it.")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(2),
              help="Generated tokens: decode tok/s is measured over them.")
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1),
              help="Prompt chunk size, the same for clusterd and mlx-lm.")
@click.option("--repetitions", "-r", default=3, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--no-mlx-lm", is_flag=True, help="Skip the single-process mlx-lm baseline (no ratios).")
@click.option("--no-ring", is_flag=True, help="Skip mlx-lm's own ring pipeline baseline.")
@click.option("--ring-launcher", is_flag=True,
              help="Start mlx-lm's ring through mlx.launch itself (its I/O relay busy-polls a "
                   "core while it runs) instead of starting its ranks directly.")
@click.option("--no-hop", is_flag=True, help="Skip the one-hop measurement against plain TCP.")
@click.option("--hop-only", is_flag=True, help="Only the one-hop measurement.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]),
              help="Hidden-state dtype of the hop (bfloat16: what a real R1 hop carries).")
@click.option("--predict", is_flag=True,
              help="Print the planner's predictions for real Mac layouts next to published "
                   "results; measures nothing.")
@click.option("--sessions", default=None, type=click.IntRange(1),
              help="--predict: sessions decoding at once in the aggregate forecast [default: 8].")
@click.option("--concurrency", default=None, metavar="C,C,...",
              help="Serving: C streams started at once through the engine, for each C, next to "
                   "mlx-lm's batched generation on the same prompts.")
@click.option("--interleave-prompt", default=None, type=click.IntRange(2), metavar="TOKENS",
              help="Serving: the running streams' inter-token intervals while a prompt this "
                   "long is prefilled, next to mlx-lm's BatchGenerator.")
@click.option("--streams", default=None, type=click.IntRange(1),
              help="--interleave-prompt: streams decoding when it arrives [default: 4].")
@click.option("--cache-turns", default=None, type=click.IntRange(2), metavar="TOKENS",
              help="Serving: TTFT of a chat's turn 2 after a turn 1 this long, with the "
                   "prompt cache and without.")
@click.option("--turn-gap", default=None, type=click.FloatRange(0), metavar="SECONDS",
              help="--cache-turns: pause between a chat's turns [default: 0, turn 2 the moment "
                   "turn 1 ends].")
@click.option("--trip-tokens", default=None, metavar="K,K,...",
              help="Serving: the cost of one trip carrying k tokens of a session, as a ratio to "
                   "a 1-token trip.")
@click.option("--trips", default=None, type=click.IntRange(1),
              help="--trip-tokens: trips per k in each round [default: 30].")
@click.option("--out", "out_dir", default=Path("benchmarks/results"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="File name stem of the results [default: bench-MODEL-DATE].")
@click.pass_context
def bench(ctx, model, preset, nodes, split, peers, prompt_tokens, new_tokens, prefill_step_size,
          repetitions, warmup, no_mlx_lm, no_ring, ring_launcher, no_hop, hop_only, dtype,
          predict, sessions, concurrency, interleave_prompt, streams, cache_turns, turn_gap,
          trip_tokens, trips, out_dir, name):
    """Tokens/sec per cluster layout, against mlx-lm in the same run.

    Every layout and both baselines (single-process mlx-lm, and mlx-lm's own
    ring pipeline with the same stages) are loaded side by side and measured
    in interleaved rounds. Results go to OUT as JSON, CSV and a PNG chart."""
    # Wide tables stay readable when the output goes to a file or a pipe.
    console = Console(width=None if sys.stdout.isatty() else 160)
    # SIGTERM (and SIGINT, which a background job may ignore) unwind through
    # the finally blocks that stop the daemons and workers this run started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    given = {p for p in ctx.params
             if ctx.get_parameter_source(p) != click.core.ParameterSource.DEFAULT}
    serving = _serving_mode(given)
    if serving:
        _serving(ctx.params, serving, given, console)
        return
    _refuse(given, _SERVING_ONLY, "the layouts bench")
    if "sessions" in given and not predict:
        raise click.UsageError("--sessions applies to --predict")
    nodes = nodes or "1,2,3"
    if predict:
        from clusterd.bench.predict import run_predict

        try:
            run_predict(console, out_dir, name or "predict", _command(),
                        **({"sessions": sessions} if sessions else {}))
        except ImportError as e:
            raise click.ClickException(f"--predict needs the shard planner: {e}") from None
        return
    if hop_only:
        _hop_only(console, out_dir, name, dtype)
        return
    if dtype != "float32":
        raise click.UsageError("--dtype applies to --hop-only (layouts use the model's own dtype)")
    from clusterd.bench.layouts import parse_nodes
    from clusterd.bench.report import print_table, write_all
    from clusterd.bench.runner import BenchConfig, default_name, run_bench
    from clusterd.coordinator.placement import SplitError
    from clusterd.coordinator.peers import PeerError

    try:
        cfg = BenchConfig(
            model=model, preset=preset, nodes=parse_nodes(nodes), split=split, peers=list(peers),
            prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            prefill_step_size=prefill_step_size, repetitions=repetitions, warmup=warmup,
            mlx_lm=not no_mlx_lm, ring=not no_ring, ring_via_launcher=ring_launcher,
            hop=not no_hop,
            command=_command())
        result = run_bench(cfg, console)
    except (SplitError, PeerError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    print_table(result, console)
    for p in write_all(result, out_dir, name or default_name(result)):
        console.print(f"wrote {p}")


def _hop_only(console: Console, out_dir: Path, name, dtype: str) -> None:
    import tempfile

    from clusterd.bench.report import print_hop, write_json
    from clusterd.bench.stats import code_version, load_average, machine, now_iso
    from clusterd.bench.hop import measure_hop

    load = load_average()
    code = code_version()
    with console.status("hop") as status:
        hop = measure_hop(Path(tempfile.mkdtemp(prefix="clusterd-hop-")), dtype=dtype,
                          progress=lambda t: status.update(f"hop: {t}"))
    print_hop(hop, console)
    result = {"command": _command(), "date": now_iso(), "machine": machine(), "code": code,
              "code_after": code_version(), "load_average_before": load,
              "load_average_after": load_average(), "hop": hop}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or ('hop' if dtype == 'float32' else 'hop-' + dtype)}.json"
    write_json(result, path)
    console.print(f"wrote {path}")


# The serving modes, each with the options only it reads.
_MODES = {"concurrency": (), "interleave_prompt": ("streams",), "cache_turns": ("turn_gap",),
          "trip_tokens": ("trips",)}
_SERVING_ONLY = {"concurrency", "interleave_prompt", "streams", "cache_turns", "turn_gap",
                 "trip_tokens", "trips"}
# Layout-bench options no serving mode reads.
_LAYOUTS_ONLY = {"no_ring", "ring_launcher", "no_hop", "hop_only", "dtype", "predict", "sessions"}


def _refuse(given: set, names: set, what: str) -> None:
    extra = sorted(given & names)
    if extra:
        flags = ", ".join("--" + n.replace("_", "-") for n in extra)
        raise click.UsageError(f"{flags} does not apply to {what}")


def _serving_mode(given: set) -> str:
    modes = [m for m in _MODES if m in given]
    if len(modes) > 1:
        raise click.UsageError("one serving mode per run: " + ", ".join(
            "--" + m.replace("_", "-") for m in modes))
    return modes[0] if modes else ""


def _serving(params: dict, mode: str, given: set, console: Console) -> None:
    from clusterd.bench.layouts import parse_nodes
    from clusterd.bench.modes import ServingConfig, parse_counts
    from clusterd.bench.serving_report import print_result, write_all
    from clusterd.coordinator.peers import PeerError
    from clusterd.coordinator.placement import SplitError

    flag = "--" + mode.replace("_", "-")
    others = {m for m in _SERVING_ONLY if m != mode and m not in _MODES[mode]}
    _refuse(given, _LAYOUTS_ONLY | others, flag)
    p = params
    try:
        fields = dict(
            model=p["model"], preset=p["preset"], nodes=tuple(parse_nodes(p["nodes"] or "1,3")),
            split=p["split"], peers=tuple(p["peers"]), prompt_tokens=p["prompt_tokens"],
            new_tokens=p["new_tokens"], prefill_step_size=p["prefill_step_size"],
            repetitions=p["repetitions"], warmup=p["warmup"], mlx_lm=not p["no_mlx_lm"],
            command=_command())
        if mode == "concurrency":
            from clusterd.bench.concurrency import run_concurrency as run

            fields["concurrency"] = parse_counts(p["concurrency"], flag)
        elif mode == "interleave_prompt":
            from clusterd.bench.interleave import run_interleave as run

            fields.update(long_prompt=p["interleave_prompt"], streams=p["streams"] or 4)
        elif mode == "cache_turns":
            from clusterd.bench.cache_turns import run_cache_turns as run

            fields.update(first_turn=p["cache_turns"], turn_gap_s=p["turn_gap"] or 0.0)
        else:
            from clusterd.bench.trips import run_trips as run

            fields.update(trip_tokens=parse_counts(p["trip_tokens"], flag),
                          trips=p["trips"] or 30)
        result = run(ServingConfig(**fields), console)
    except (SplitError, PeerError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    print_result(result, console)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = p["name"] or f"{result['mode']}-{result['model']['name']}-{stamp}"
    for path in write_all(result, p["out_dir"], name):
        console.print(f"wrote {path}")
