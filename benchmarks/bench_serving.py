"""The serving engine's modes of `clusterd bench` (see the README, "Benchmarks"): streams at
once (--concurrency), a long prompt arriving while streams decode (--interleave-prompt), a
second chat turn with and without the prompt cache (--cache-turns), multi-token trips
(--trip-tokens).

    python benchmarks/bench_serving.py --concurrency 1,2,4,8 [MODEL] [clusterd bench options]
"""

import sys

from clusterd.cli import main

if __name__ == "__main__":
    sys.argv = ["clusterd", "bench", *sys.argv[1:]]
    main()
