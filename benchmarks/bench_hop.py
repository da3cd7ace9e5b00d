"""One decode hop (7168 float32 values) between daemons, next to plain TCP:
`clusterd bench --hop-only`.

    python benchmarks/bench_hop.py [--out DIR] [--name NAME]
"""

import sys

from clusterd.cli import main

if __name__ == "__main__":
    sys.argv = ["clusterd", "bench", "--hop-only", *sys.argv[1:]]
    main()
