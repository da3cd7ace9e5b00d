"""What `mx.metal.device_info()` answers on real Macs (mlx 0.2x-0.3x keys).

The M2 Ultra's raised-limit figures are the ones shown when the call was
added to mlx (ml-explore/mlx#1060: 188,743,680,000 bytes = 180,000 MiB after
`sudo sysctl iogpu.wired_limit_mb=180000`); its default, 147,456 MiB, is what
llama.cpp logs as recommendedMaxWorkingSetSize on that Mac (and what
tests/test_resources.py uses). The others follow macOS 14/15's default of 75%
of RAM (48 of 64 GiB on the M4 Pro, 384 of 512 GiB on the M3 Ultra).
"""

GiB = 2**30

M2_ULTRA_192 = {
    "architecture": "applegpu_g14d",
    "device_name": "Apple M2 Ultra",
    "memory_size": 192 * GiB,
    "max_buffer_length": 115_964_116_992,
    "max_recommended_working_set_size": 147_456 * 2**20,
    "resource_limit": 499_000,
}
M2_ULTRA_192_RAISED = {**M2_ULTRA_192, "max_recommended_working_set_size": 188_743_680_000}
M4_PRO_64 = {
    "architecture": "applegpu_g16s",
    "device_name": "Apple M4 Pro",
    "memory_size": 64 * GiB,
    "max_buffer_length": 38_654_705_664,
    "max_recommended_working_set_size": 48 * GiB,
    "resource_limit": 499_000,
}
M3_ULTRA_512 = {
    "architecture": "applegpu_g15d",
    "device_name": "Apple M3 Ultra",
    "memory_size": 512 * GiB,
    "max_buffer_length": 309_237_645_312,
    "max_recommended_working_set_size": 384 * GiB,
    "resource_limit": 499_000,
}
MACS = {"m2-ultra-192": M2_ULTRA_192, "m4-pro-64": M4_PRO_64, "m3-ultra-512": M3_ULTRA_512}
