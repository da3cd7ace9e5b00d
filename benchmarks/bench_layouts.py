"""Tokens/sec per cluster layout against mlx-lm: `clusterd bench` (see the README, "Benchmarks").

    python benchmarks/bench_layouts.py [MODEL] [clusterd bench options]
"""

import sys

from clusterd.cli import main

if __name__ == "__main__":
    sys.argv = ["clusterd", "bench", *sys.argv[1:]]
    main()
