"""Per-chip peak FLOP/s and memory, for MFU and for checking that a step fits.

Peaks are dense bfloat16 matmul throughput from the vendors' spec sheets; MFU is quoted
against them whatever dtype the run computes in, the usual convention.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float     # dense bf16 FLOP/s per chip
    hbm_bytes: float      # device memory per chip


GiB = 1024 ** 3

# Matched against `device.device_kind` in order, so more specific names come first.
CHIPS = (
    ("TPU v5 lite", Chip("TPU v5e", 197e12, 16 * GiB)),
    ("TPU v5e", Chip("TPU v5e", 197e12, 16 * GiB)),
    ("TPU v5p", Chip("TPU v5p", 459e12, 95 * GiB)),
    ("TPU v5", Chip("TPU v5p", 459e12, 95 * GiB)),
    ("TPU v6 lite", Chip("TPU v6e", 918e12, 32 * GiB)),
    ("TPU v6e", Chip("TPU v6e", 918e12, 32 * GiB)),
    ("TPU v4", Chip("TPU v4", 275e12, 32 * GiB)),
    ("H200", Chip("NVIDIA H200", 989e12, 141e9)),
    ("H100", Chip("NVIDIA H100", 989e12, 80e9)),
)


def chip_for(device_kind: str) -> Chip | None:
    for pattern, chip in CHIPS:
        if pattern.lower() in device_kind.lower():
            return chip
    return None
