"""Which JAX platforms to start: no TPU runtime on a machine without a TPU chip.

The tpu and test extras install libtpu so that preflight can compile for TPU slices from any
machine. JAX then starts libtpu on every run, and where there is no TPU chip libtpu logs
errors about missing TPU workers before JAX falls back to the CPU. Naming the CPU platform
avoids that. An explicit JAX_PLATFORMS, a TPU chip or an NVIDIA GPU leaves JAX's own choice
alone, and compiling for a described TPU slice (preflight) works either way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor


def _has_tpu_chip() -> bool:
    for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def skip_absent_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if Path("/dev/nvidiactl").exists() or _has_tpu_chip():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported, but no backend has started yet
        sys.modules["jax"].config.update("jax_platforms", "cpu")
