"""TPU slices named as Cloud TPU names them (`v5p-128`), as devices XLA can compile for here.

libtpu's ahead-of-time path describes a slice without owning one, so the real train step can
be compiled for a pod on a laptop. It needs libtpu at the version jax pins (`pip install -e
'.[tpu]'`). Names count TensorCores for v4 and v5p (two a chip: v5p-128 is 64 chips, 4x4x4)
and chips for v5e and v6e (v5e-256 is 16x16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from scaling.errors import UserError


@dataclasses.dataclass(frozen=True)
class Generation:
    cores_per_chip: int   # what the number in the name counts, per chip
    torus_dims: int       # 3 for v4 and v5p, 2 for v5e and v6e
    chip_config: str      # libtpu's name for one device per chip
    min_chips: int
    max_chips: int


GENERATIONS = {
    "v4": Generation(2, 3, "megacore", 4, 4096),
    "v5p": Generation(2, 3, "megacore", 4, 4096),
    "v5e": Generation(1, 2, "default", 1, 256),
    "v6e": Generation(1, 2, "default", 1, 256),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str                # as given, e.g. v5p-128
    generation: str          # v5p
    shape: tuple[int, ...]   # chips along each torus axis, e.g. (4, 4, 4)

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def known_names() -> str:
    """Every name `parse_slice` accepts, written compactly for an error message."""
    parts = []
    for name, g in GENERATIONS.items():
        sizes = [c * g.cores_per_chip for c in _chip_counts(g)]
        parts.append(f"{name}-{sizes[0]}, {name}-{sizes[1]} … {name}-{sizes[-1]}")
    return "; ".join(parts) + " (powers of two)"


def _chip_counts(generation: Generation) -> list[int]:
    counts = []
    chips = generation.min_chips
    while chips <= generation.max_chips:
        counts.append(chips)
        chips = 4 if chips == 1 else chips * 2
    return counts


def _torus_shape(num_chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape: powers of two as even as they come, larger axes last."""
    if dims == 3 and num_chips == 4:
        return (2, 2, 1)
    bits = num_chips.bit_length() - 1
    return tuple(2 ** (bits // dims + (i >= dims - bits % dims)) for i in range(dims))


def parse_slice(name: str) -> Slice:
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = GENERATIONS.get(match.group(1)) if match else None
    if generation is not None:
        count = int(match.group(2))
        chips, rest = divmod(count, generation.cores_per_chip)
        if not rest and chips in _chip_counts(generation):
            return Slice(name, match.group(1), _torus_shape(chips, generation.torus_dims))
    raise UserError(f"--topology={name}: unknown TPU slice; known: {known_names()}")


def _load_libtpu_as_compiler(slice_: Slice) -> None:
    """Where jax found no TPU chip (it then sets TPU_SKIP_MDS_QUERY), libtpu would still look
    for this host's workers when it loads, log errors about them, and take a lock file that any
    other JAX process on the machine may hold. These settings make it load as a compiler only."""
    if os.environ.get("TPU_SKIP_MDS_QUERY") != "1":
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.name)


def compile_only_devices(slice_: Slice, num_slices: int = 1) -> list[jax.Device]:
    """One device per chip of `num_slices` such slices, good for compiling and nothing else."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"--topology={slice_.name}: compiling for a TPU needs libtpu; install "
                        "it with pip install -e '.[tpu]' (or pip install 'jax[tpu]')")
    from jax.experimental import topologies

    _load_libtpu_as_compiler(slice_)
    generation = GENERATIONS[slice_.generation]
    host_bounds = tuple(min(2, d) for d in slice_.shape[:2]) + (1,)
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=slice_.topology_name,
        chip_config_name=generation.chip_config, chips_per_host_bounds=host_bounds,
        num_slices=num_slices)
    return list(description.devices)
