"""One rule for duplicate node ids, in every command: two processes that
claim one node id (a copied clusterd folder) are used by none, with one
message; one process reached under two addresses is one node."""

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from clusterd.discovery import discover
from clusterd.home import clusterd_home
from clusterd.local_cluster import start_node
from clusterd.security import SECRET_ENV, load_secret

MESSAGE = re.compile(r"2 different processes claim the same node id \S+: .*? until then\.")


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twins")
    env = {SECRET_ENV: load_secret(clusterd_home(), create=True)}
    first = start_node(tmp, "twin-a", env={**env, "CLUSTERD_HOME": str(tmp / "home-a")})
    shutil.copytree(tmp / "home-a", tmp / "home-b")  # a copied clusterd folder: the same id
    try:
        second = start_node(tmp, "twin-b", env={**env, "CLUSTERD_HOME": str(tmp / "home-b")})
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def clusterd(*args):
    return subprocess.run([sys.executable, "-m", "clusterd", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_every_command_refuses_them_with_the_same_message(twins, synthetic):
    model = str(synthetic("deepseek_v3", "tiny"))
    peers = sum((["--peer", n.address] for n in twins), [])
    commands = {
        "nodes": ["nodes", "--no-mdns", *peers],
        "status": ["status", "--no-mdns", *peers],
        "run": ["run", model, *peers, "--prompt", "hi", "--max-tokens", "2"],
        "serve": ["serve", model, *peers, "--http-port", "0"],
        "pull": ["pull", model, *peers],
        "plan": ["plan", model, *peers],
        "doctor": ["doctor", "--no-mdns", *peers],
    }
    messages = {}
    for name, args in commands.items():
        out = clusterd(*args)
        found = MESSAGE.findall(out.stderr)
        assert found, f"{name}: {out.stderr}"
        messages[name] = found[0]
        if name in ("nodes", "status"):
            assert out.stdout.count("duplicate id") == 2, out.stdout  # listed, not used
            assert "0 of 2 nodes usable" in out.stdout
        else:
            assert out.returncode != 0, name
    assert len(set(messages.values())) == 1, messages
    (text,) = set(messages.values())
    assert "--new-id" in text and all(n.address in text for n in twins)
    assert all(n.proc.poll() is None for n in twins)  # refused, not harmed


def test_a_new_id_fixes_it(twins, tmp_path):
    """What the message says to do works: after `up --new-id` the two are two nodes."""
    env = {SECRET_ENV: load_secret(clusterd_home(), create=True),
           "CLUSTERD_HOME": str(tmp_path / "home-c")}
    shutil.copytree(twins[0].log_path.parent / "home-a", tmp_path / "home-c")
    fixed = start_node(tmp_path, "twin-c", env=env, extra=["--new-id"])
    try:
        out = clusterd("nodes", "--no-mdns", "--peer", twins[0].address, "--peer", fixed.address)
        assert "2 of 2 nodes usable" in out.stdout and "duplicate" not in out.stderr
    finally:
        fixed.stop()


def test_one_process_under_two_addresses_is_one_node():
    """Pure logic with a fake probe: the same node id and boot id at two
    addresses (Wi-Fi and Thunderbolt Bridge) is counted once."""
    live = SimpleNamespace(node_id="n1", boot_id="b1", name="studio", protocol_version=1,
                           state="idle", usable_memory_bytes=1, total_memory_bytes=1, chip="",
                           bandwidth_gbs=0.0, has_shard=False, shard=None)
    twin = SimpleNamespace(**{**vars(live), "boot_id": "b2"})
    answers = {"10.0.0.2:50051": live, "169.254.3.4:50051": live, "10.0.0.9:50051": twin}
    result = discover(answers.__getitem__, mdns=False,
                      peers=["10.0.0.2:50051", "169.254.3.4:50051"])
    (report,) = result.reports
    assert report.usable and set(report.node.addresses) == {"10.0.0.2", "169.254.3.4"}
    assert result.duplicates == () and any("counted once" in n for n in result.notes)
    # A second process with the same id is a duplicate, whatever its address.
    result = discover(answers.__getitem__, mdns=False, peers=["10.0.0.2:50051", "10.0.0.9:50051"])
    (dup,) = result.duplicates
    assert not any(r.usable for r in result.reports) and "until then" in dup.message()
