"""`clusterd demo` runs the whole path and leaves no daemon behind."""

import re
import subprocess
import sys

import psutil


def test_demo_matches_mlx_lm_and_stops_its_daemons(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "clusterd", "demo", "--preset", "tiny", "--max-tokens", "24"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "identical: 24 of 24 tokens match mlx-lm" in out.stdout
    assert "random" in out.stdout
    layers = re.findall(r"layers \[\s*(\d+),\s*(\d+)\)", out.stdout)
    assert len(layers) == 3 and layers[0][0] == "0"
    pids = [int(p) for p in re.findall(r"pid (\d+)", out.stdout)]
    assert len(pids) == 3
    assert not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
