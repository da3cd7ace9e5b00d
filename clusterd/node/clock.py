"""The node's wall clock, which a test can set wrong.

`CLUSTERD_TEST_CLOCK_OFFSET_S=SECONDS` (a test aid, never needed in use)
shifts what this daemon takes for the time: the clock it checks proofs
against and the time its Health reports. It imitates a Mac whose clock is
off, so `clusterd doctor` can be tested on a skewed clock without changing
the machine's time.
"""

import os
import time
from typing import Callable, Mapping

CLOCK_OFFSET_ENV = "CLUSTERD_TEST_CLOCK_OFFSET_S"


def node_clock(env: Mapping[str, str] = os.environ) -> Callable[[], float]:
    text = env.get(CLOCK_OFFSET_ENV, "").strip()
    if not text:
        return time.time
    try:
        offset = float(text)
    except ValueError:
        raise ValueError(f"${CLOCK_OFFSET_ENV}={text!r} is not a number of seconds") from None
    return lambda: time.time() + offset
