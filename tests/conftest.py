import os
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from clusterd.local_cluster import LocalCluster  # noqa: E402

# One cluster secret for the test run, shared by the test process and every
# daemon it starts; and a clusterd folder of its own, never the user's.
os.environ.setdefault("CLUSTERD_SECRET", secrets.token_hex(24))
os.environ["CLUSTERD_HOME"] = tempfile.mkdtemp(prefix="clusterd-test-home-")


@pytest.fixture(scope="session")
def synthetic():
    """Build (or reuse from the on-disk cache) a synthetic model directory."""
    from clusterd.models.synthetic import build_synthetic_model

    def build(arch: str, preset: str = "tiny", seed: int = 0, **kw) -> Path:
        return build_synthetic_model(arch, preset, seed, **kw)

    return build


@pytest.fixture(scope="module")
def model(synthetic):
    """The tiny synthetic DeepSeek-V3 (modules may define their own `model`)."""
    return synthetic("deepseek_v3", "tiny")


@pytest.fixture
def peer(node):
    """A client of the module's `node` fixture (a daemon), closed after the test."""
    from clusterd.coordinator.peers import PeerHandle

    p = PeerHandle(node.address)
    yield p
    p.close()


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Three real daemon processes on loopback, shared by a test module."""
    tmp = tmp_path_factory.mktemp("nodes")
    with LocalCluster(3, workdir=tmp, prefix="node") as cluster:
        yield cluster
