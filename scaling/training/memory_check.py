"""Refuse a run that obviously cannot fit, before anything is allocated.

Two sizes are known from shapes alone: the train state each device holds (params and
optimizer state, from their shardings) and the batches each host holds at once (its rows of
`steps_per_call` global batches, plus those read ahead). If either alone exceeds the memory
it lives in, the run would die minutes later in an allocator with a message about bytes and
no hint; here it stops at once with the sizes and the settings that change them. Activations
are not counted, so passing this check is no promise that the step fits: preflight measures
that.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from scaling.errors import UserError
from scaling.training.state_summary import bytes_per_device, format_bytes


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int:
    """What one device can hold: its own memory, or for CPU devices their share of the
    host's (they all live in it)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes() // max(1, jax.local_device_count())


def check_fits(config, abstract_state, element_spec: dict, devices,
               prefetch_steps: int) -> None:
    state = bytes_per_device(abstract_state)
    limit = device_memory_bytes(devices[0])
    if state > limit:
        raise UserError(
            f"the train state needs {format_bytes(state)} a device (params "
            f"{format_bytes(bytes_per_device(abstract_state.params))}, optimizer state "
            f"{format_bytes(bytes_per_device(abstract_state.opt_state))}), more than the "
            f"{format_bytes(limit)} each {devices[0].platform} device has: shrink the model "
            "(--config.model.*), split it over more devices (--config.mesh.fsdp, "
            "--config.mesh.tensor), or check the sizes with --mode=describe")
    example = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                  for s in element_spec.values())
    rows = -(-config.batch_size // jax.process_count())
    held = config.steps_per_call * (1 + prefetch_steps)
    batches = rows * example * held
    host = host_memory_bytes()
    if batches > host:
        raise UserError(
            f"--config.batch_size={config.batch_size}: each host would hold "
            f"{format_bytes(batches)} of batches ({rows:,} rows of {format_bytes(example)}, "
            f"{held} batches at once: steps_per_call and those read ahead), more than its "
            f"{format_bytes(host)} of memory; use a smaller batch or fewer "
            "--config.steps_per_call")
