"""Per-chip peak FLOP/s and memory, for MFU and for checking that a step fits.

Peaks are dense bfloat16 matmul throughput from the vendors' spec sheets; MFU is quoted
against them whatever dtype the run computes in, the usual convention. Bandwidths are spec-sheet
numbers too (Cloud TPU system-architecture pages, NVIDIA H100/H200 data sheets): HBM bytes per
second, and interconnect bytes per second per chip counting every link in both directions
(ICI on TPU, NVLink on GPU). Real collectives reach only part of it, so times estimated from it
are lower bounds.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float     # dense bf16 FLOP/s per chip
    hbm_bytes: float      # device memory per chip
    hbm_bandwidth: float  # bytes/s between HBM and the chip
    ici_bandwidth: float  # bytes/s per chip over the chip-to-chip links, both directions


GB = 1e9
GiB = 1024 ** 3

V4 = Chip("TPU v4", 275e12, 32 * GiB, 1200 * GB, 600 * GB)
V5E = Chip("TPU v5e", 197e12, 16 * GiB, 819 * GB, 400 * GB)
V5P = Chip("TPU v5p", 459e12, 95 * GiB, 2765 * GB, 1200 * GB)
V6E = Chip("TPU v6e", 918e12, 32 * GiB, 1638 * GB, 800 * GB)

# Matched against `device.device_kind` in order, so more specific names come first.
CHIPS = (
    ("TPU v5 lite", V5E),
    ("TPU v5e", V5E),
    ("TPU v5p", V5P),
    ("TPU v5", V5P),
    ("TPU v6 lite", V6E),
    ("TPU v6e", V6E),
    ("TPU v4", V4),
    ("H200", Chip("NVIDIA H200", 989e12, 141e9, 4800 * GB, 900 * GB)),
    ("H100", Chip("NVIDIA H100", 989e12, 80e9, 3350 * GB, 900 * GB)),
)


def chip_for(device_kind: str) -> Chip | None:
    for pattern, chip in CHIPS:
        if pattern.lower() in device_kind.lower():
            return chip
    return None
