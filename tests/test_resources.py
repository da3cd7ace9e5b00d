"""Resource probes: macOS answers recorded from real Macs, Linux fallback."""

import pytest

from clusterd.node.resources import mac_chip, mac_usable_bytes, parse_size, probe

GiB = 2**30


def sysctl_from(recorded: dict):
    return lambda name: recorded.get(name)


# `sysctl -n` answers as recorded on a Mac Studio M2 Ultra 192 GB (wired limit
# at the system default, then raised by the user), and a Mac mini M4 Pro 64 GB.
M2_ULTRA_DEFAULT = {"machdep.cpu.brand_string": "Apple M2 Ultra", "hw.memsize": str(192 * GiB),
                    "iogpu.wired_limit_mb": "0"}
M2_ULTRA_RAISED = {**M2_ULTRA_DEFAULT, "iogpu.wired_limit_mb": "180000"}
M4_PRO = {"machdep.cpu.brand_string": "Apple M4 Pro", "hw.memsize": str(64 * GiB),
          "iogpu.wired_limit_mb": "0"}


def test_default_wired_limit_comes_from_metal():
    metal = 147_456 * 2**20  # Metal's recommended working set on that Mac
    assert mac_usable_bytes(192 * GiB, sysctl_from(M2_ULTRA_DEFAULT), metal) == metal


def test_raised_wired_limit_wins():
    assert mac_usable_bytes(192 * GiB, sysctl_from(M2_ULTRA_RAISED), 147 * GiB) == 180000 * 2**20


def test_no_metal_answer_falls_back_to_a_fraction():
    assert mac_usable_bytes(64 * GiB, sysctl_from(M4_PRO), None) == 48 * GiB


def test_chip_name():
    assert mac_chip(sysctl_from(M4_PRO)) == "Apple M4 Pro"
    assert mac_chip(sysctl_from({})) == "Apple Silicon"


def test_linux_probe_and_memory_limit():
    r = probe()
    assert 0 < r.usable_bytes <= r.total_bytes
    capped = probe(memory_limit=3 * GiB)
    assert capped.usable_bytes <= 3 * GiB


@pytest.mark.parametrize("text, value", [("48G", 48 * GiB), ("512M", 512 * 2**20),
                                         ("1.5T", int(1.5 * 2**40)), ("1024", 1024),
                                         ("64GiB", 64 * GiB), ("2gb", 2 * GiB)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-3G", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
