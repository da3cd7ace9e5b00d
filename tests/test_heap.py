"""An idle node gives freed memory back to the system: what threads freed
stays in the C allocator's arenas otherwise (the soak's idle-to-idle RSS
grew with every new peak of concurrent calls)."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import threading, psutil
    from clusterd.node.heap import give_back

    kept = []
    def churn():
        # 4 KiB blocks (malloc, not Python's small-object pools), every 64th
        # kept alive so the freed ones are holes the allocator cannot shrink past.
        blocks = [bytes(4096) for _ in range(40_000)]
        kept.extend(blocks[::64])
    t = threading.Thread(target=churn)  # a worker thread: its own arena
    t.start(); t.join()
    rss = psutil.Process().memory_info().rss
    give_back()
    print(rss, psutil.Process().memory_info().rss, len(kept))
""")


def test_give_back_returns_what_a_thread_freed():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    # 160 MiB allocated, about 2.5 MiB still alive: most of it must go back.
    assert before - after > 100 * 2**20, (before, after)
