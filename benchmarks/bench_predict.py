"""The planner's predictions for real Mac layouts next to published results:
`clusterd bench --predict`.

    python benchmarks/bench_predict.py [--out DIR] [--name NAME]
"""

import sys

from clusterd.cli import main

if __name__ == "__main__":
    sys.argv = ["clusterd", "bench", "--predict", *sys.argv[1:]]
    main()
