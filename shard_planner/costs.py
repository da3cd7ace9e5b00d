"""The cost model shared by the planner and the simulator: links, hops, efficiencies.

A decode hop carries one hidden vector (7168 values for R1, 14 KB in bf16), so per-hop
latency, not bandwidth, is its cost; a prefill hop carries a whole chunk (29 MB for R1's
2048-token chunks), where bandwidth matters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkSpec:
    name: str
    latency_s: float  # one way, per hop
    bandwidth_gbps: float  # gigabits per second the transport reaches
    source: str

    def transfer_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_gbps * 1e9)


# Figures from the link table of the README's planning section (Geerling, pico.scorpiox, georgiedekker mlx-ring,
# labscommunity/cascadia, NetworkChuck, mlx docs). 10GbE, 1GbE and Wi-Fi latencies are typical
# LAN figures, not measurements from those sources: treat them as assumptions.
LINKS: dict[str, LinkSpec] = {
    "tb5-rdma": LinkSpec("tb5-rdma", 50e-6, 80.0,
                         "RDMA over TB5 (macOS 26.2+, MLX JACCL): 3-50 us, up to 80 Gb/s claimed "
                         "(Geerling; NetworkChuck; mlx docs); upper latency used"),
    "tb5": LinkSpec("tb5", 300e-6, 20.0,
                    "Thunderbolt bridge, TCP: ~300 us, 10-20 Gb/s TCP (Geerling; georgiedekker "
                    "mlx-ring); TCP latency, not the cable, bounds TB5 too"),
    "tb4": LinkSpec("tb4", 300e-6, 10.0,
                    "Thunderbolt 4 bridge, TCP: ~0.6 ms ping (pico.scorpiox), 8.75 Gb/s "
                    "(labscommunity/cascadia PR #1)"),
    "10gbe": LinkSpec("10gbe", 100e-6, 9.4, "10 Gigabit Ethernet: typical LAN latency (assumed)"),
    "1gbe": LinkSpec("1gbe", 250e-6, 0.94, "Gigabit Ethernet: typical LAN latency (assumed)"),
    "wifi": LinkSpec("wifi", 3e-3, 0.3,
                     "Wi-Fi: high jitter, multicast often blocked (exo #603, #2271); 3 ms and "
                     "300 Mb/s assumed"),
}

DEFAULT_LINK = "tb5"

# Fraction of a node's memory bandwidth one decode step reaches. Calibrated on mlx-lm on one
# M3 Ultra (819 GB/s) with R1 4-bit (23.0 GB read per token at group size 32): the 17-18
# tok/s press figures give 0.48-0.51 (the forum report of 6.4 tok/s would be 0.18).
DECODE_EFFICIENCY = 0.5
# Fraction of GPU FP32 peak that prefill reaches. Calibrated on mlx-lm's 59.6 tok/s on a 13k
# token prompt on one M3 Ultra: about 114 GFLOP per token (weights plus MLA attention at that
# length) is 6.8 TFLOPS of 28.4, so 0.24.
PREFILL_EFFICIENCY = 0.24

# What travels back from the last stage to the first each step: a token id and its framing.
TOKEN_HOP_BYTES = 64

# Software cost of one hop on top of the link: one gRPC call with a 14 KB payload from Python.
# An assumption of the order of a Python gRPC unary call until `clusterd bench` measures it.
DEFAULT_STACK_OVERHEAD_S = 200e-6


def get_link(name: str | LinkSpec) -> LinkSpec:
    if isinstance(name, LinkSpec):
        return name
    try:
        return LINKS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown link {name!r} (known: {', '.join(LINKS)})") from None


def hop_seconds(link: LinkSpec, payload_bytes: int,
                overhead_s: float = DEFAULT_STACK_OVERHEAD_S) -> float:
    return link.latency_s + link.transfer_s(payload_bytes) + overhead_s
