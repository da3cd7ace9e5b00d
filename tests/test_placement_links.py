"""The default split uses the links `clusterd doctor` measured, when the
file is there and recent, and says which it used."""

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from clusterd.coordinator.placement import measured_links, plan_ranges
from clusterd.doctor.links import MeasuredLink, write_links

GiB = 2**30


def live_node(name, address):
    info = SimpleNamespace(name=name, node_id=name, chip="Apple M2 Ultra",
                           total_memory_bytes=192 * GiB, usable_memory_bytes=144 * GiB,
                           bandwidth_gbs=800.0, free_disk_bytes=0, platform="Darwin arm64")
    return SimpleNamespace(info=info, peer=SimpleNamespace(address=address))


NODES = [live_node("mac0", "10.0.0.1:50051"), live_node("mac1", "10.0.0.2:50051")]
MEASURED = [MeasuredLink("mac0", "mac1", 0.45, 9000.0), MeasuredLink("mac1", "mac0", 0.5, 8800.0)]


def test_no_file_says_the_preset_is_used(tmp_path):
    links, note = measured_links(tmp_path / "links.json", ["mac0", "mac1"])
    assert links is None and "no measured links" in note and "clusterd doctor" in note


def test_old_or_broken_files_are_not_used(tmp_path):
    path = write_links(tmp_path, MEASURED, now=datetime.now(timezone.utc) - timedelta(days=3))
    links, note = measured_links(path, ["mac0", "mac1"])
    assert links is None and "3 day(s)" in note and "too long to trust" in note
    path.write_text(json.dumps({"measured_at": "yesterday", "links": []}))
    links, note = measured_links(path, ["mac0", "mac1"])
    assert links is None and "ignoring the measured links" in note


def test_recent_links_go_to_the_planner(tmp_path, synthetic):
    """Needs shard_planner's plan(..., links=...)."""
    path = write_links(tmp_path, MEASURED + [MeasuredLink("mac0", "elsewhere", 9.0, 10.0)])
    links, note = measured_links(path, ["mac0", "mac1"])
    assert set(links) == {("mac0", "mac1"), ("mac1", "mac0")}  # only between these nodes
    assert links[("mac0", "mac1")].latency_s == 0.45 / 2e3
    notes = []
    ranges = plan_ranges(synthetic("deepseek_v3", "tiny"), NODES, None,
                         on_note=notes.append, links_file=path)
    assert any("the split uses the links clusterd doctor measured" in n for n in notes)
    assert [r for r in ranges if r] and ranges[0][0] == 0
