"""How long planning DeepSeek-R1 671B across 16 nodes takes.

    .venv/bin/python benchmarks/plan_speed.py [--repeat 20] [--write benchmarks/results/plan_speed.md]

Times the full `shard_planner.planner.plan` call (accounting already built; the search, the
verdict and all advice) and, separately, building the model accounting from config.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clusterd.models.catalog import load_config, resolve  # noqa: E402
from shard_planner.hardware import NodeSpec, parse_node_arg  # noqa: E402
from shard_planner.model_spec import model_spec_from_config  # noqa: E402
from shard_planner.planner import plan  # noqa: E402

CLUSTERS: dict[str, Callable[[], list[NodeSpec]]] = {
    # Fits: the search decides how many of the 16 minis to use.
    "16 x M4 Pro 64 GB": lambda: parse_node_arg("m4-pro:64x16"),
    # Mixed chips and bandwidths: the search must trade bytes against bandwidth.
    "8 x M4 Pro 64 + 4 x M2 Ultra 192 + 4 x M4 Max 128": lambda: (
        parse_node_arg("m4-pro:64x8") + parse_node_arg("m2-ultra:192x4", start_index=9)
        + parse_node_arg("m4-max:128x4", start_index=13)),
    # Does not fit: every alternative in the advice is searched as well.
    "16 x M4 Pro 24 GB (does not fit)": lambda: parse_node_arg("m4-pro:24x16"),
}


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    r = resolve("deepseek-r1", "4bit")
    config = load_config("deepseek-r1")
    build = timed(lambda: model_spec_from_config(config, r.quantization), args.repeat)
    spec = model_spec_from_config(config, r.quantization, name="deepseek-r1")
    rows = []
    for label, make in CLUSTERS.items():
        nodes = make()
        assert len(nodes) == 16
        p = plan(spec, nodes)
        times = timed(lambda: plan(spec, nodes), args.repeat)
        rows.append((label, p.verdict, len(p.stages), statistics.median(times), max(times)))
    lines = [
        "# Planning speed: DeepSeek-R1 671B (4bit-g32, 61 layers) across 16 nodes",
        "",
        f"Command: `.venv/bin/python benchmarks/plan_speed.py --repeat {args.repeat}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, Python {platform.python_version()}, "
        "2 cores shared with other test runs.",
        "",
        f"Model accounting from config.json: median {statistics.median(build) * 1000:.1f} ms.",
        "",
        "| cluster | verdict | stages | median | max |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {label} | {verdict} | {stages} | {med * 1000:.1f} ms | {mx * 1000:.1f} ms |"
              for label, verdict, stages, med, mx in rows]
    lines += ["", "Each time is one full `plan()` call: the exact search over layer boundaries, "
              "the verdict, and the advice (which re-checks every alternative it offers)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
