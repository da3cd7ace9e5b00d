"""`clusterd bench [MODEL]`: tokens/sec per cluster layout against mlx-lm in
the same run, one decode hop against plain TCP, and (--predict) the planner's
forecasts for real Mac layouts next to published results."""

from __future__ import annotations

import shlex
import signal
import sys
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
@click.option("--nodes", default="1,2,3", show_default=True, metavar="N,N,...",
              help="Layouts: how many nodes each uses.")
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
@click.option("--out", "out_dir", default=Path("benchmarks/results"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="File name stem of the results [default: bench-MODEL-DATE].")
def bench(model, preset, nodes, split, peers, prompt_tokens, new_tokens, prefill_step_size,
          repetitions, warmup, no_mlx_lm, no_ring, ring_launcher, no_hop, hop_only, dtype,
          predict, out_dir, name):
    """Tokens/sec per cluster layout, against mlx-lm in the same run.

    Every layout and both baselines (single-process mlx-lm, and mlx-lm's own
    ring pipeline with the same stages) are loaded side by side and measured
    in interleaved rounds. Results go to OUT as JSON, CSV and a PNG chart."""
    # Wide tables stay readable when the output goes to a file or a pipe.
    console = Console(width=None if sys.stdout.isatty() else 160)
    # SIGTERM (and SIGINT, which a background job may ignore) unwind through
    # the finally blocks that stop the daemons and workers this run started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if predict:
        from clusterd.bench.predict import run_predict

        try:
            run_predict(console, out_dir, name or "predict", _command())
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
