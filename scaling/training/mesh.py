"""The device mesh, and the mapping from logical axis names to shardings.

Models only name axes logically (`batch`, `embed`, `mlp`, ...). The config's
`sharding_rules` map those names onto the mesh axes `data`, `fsdp` and `tensor`; this module
and the step builder are the only places that touch `jax.sharding`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from scaling.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict:
    """Fill in the one axis that may be -1 so the product equals the device count."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    flags = " ".join(f"--config.mesh.{a}={s}" for a, s in sizes.items())
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise UserError(f"{flags}: at most one mesh axis may be -1 (meaning 'the rest')")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise UserError(
                f"{flags}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} available devices")
        sizes[unknown[0]] = num_devices // known
    elif num_devices % known:
        raise UserError(f"{flags}: the mesh sizes multiply to {known}, which does not divide "
                        f"the {num_devices} available devices; set one axis to -1 for the rest")
    elif known != num_devices:
        raise UserError(f"{flags}: the mesh covers {known} of the {num_devices} available "
                        "devices; make the sizes multiply to the device count, or set one "
                        "axis to -1")
    return sizes


def dcn_sizes(mesh_config: ml_collections.ConfigDict) -> dict:
    """Per-axis parallelism across slices (data-centre network); 1 everywhere in one slice."""
    sizes = {axis: int(mesh_config.get(f"dcn_{axis}", 1)) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size < 1:
            raise UserError(f"--config.mesh.dcn_{axis}={size}: must be positive")
    return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[dict, dict]:
    """(ICI sizes within a slice, DCN sizes across slices) that cover `num_devices`."""
    dcn = dcn_sizes(mesh_config)
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise UserError(f"--config.mesh.dcn_*: {num_slices} slices do not divide the "
                        f"{num_devices} available devices")
    return resolve_axis_sizes(mesh_config, num_devices // num_slices), dcn


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices, laid out so the innermost axes get the fastest links.

    With DCN parallelism it is a hybrid mesh: each mesh axis is ICI size × DCN size, and the
    DCN part spans slices (TPU multi-slice) or, where devices carry no slice, processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(mesh_config, len(devices))
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    if math.prod(dcn.values()) > 1:
        slices = {getattr(d, "slice_index", 0) for d in devices}
        granules = len(slices) if len(slices) > 1 else len({d.process_index for d in devices})
        num_slices = math.prod(dcn.values())
        if granules != num_slices:
            raise UserError(
                f"--config.mesh.dcn_*: the DCN axes multiply to {num_slices} slices, but this "
                f"run has {granules} {'slices' if len(slices) > 1 else 'processes'}")
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, tuple(dcn[a] for a in MESH_AXES), devices,
            process_is_granule=len(slices) == 1)
        return Mesh(device_array, MESH_AXES)
    try:
        device_array = mesh_utils.create_device_mesh(ici_shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topology-aware placement is unavailable (for example for some fake devices).
        device_array = np.asarray(devices).reshape(ici_shape)
    return Mesh(device_array, MESH_AXES)


def make_abstract_mesh(mesh_config: ml_collections.ConfigDict, num_devices: int) -> AbstractMesh:
    """A mesh of `num_devices` that exist only as a shape: enough for shardings and memory."""
    ici, dcn = mesh_shape(mesh_config, num_devices)
    return AbstractMesh(tuple(ici[a] * dcn[a] for a in MESH_AXES), MESH_AXES)


def platform(mesh: Mesh | AbstractMesh) -> str | None:
    """The platform of a concrete mesh's devices (cpu, gpu, tpu); None for a mesh that is
    only a shape."""
    if isinstance(mesh, AbstractMesh):
        return None
    return mesh.devices.flat[0].platform


def rules_from_config(config: ml_collections.ConfigDict) -> tuple:
    """The config's rules as the tuple of (logical, mesh axes) pairs that flax expects."""
    rules = []
    for logical, physical in config.sharding_rules:
        if isinstance(physical, list):
            physical = tuple(physical)
        rules.append((logical, physical))
    return tuple(rules)


def batch_axes(rules: tuple) -> tuple[str, ...]:
    """The mesh axes that the batch dimension is split over."""
    for logical, physical in rules:
        if logical == "batch":
            if physical is None:
                return ()
            return (physical,) if isinstance(physical, str) else tuple(physical)
    return ()


def data_parallel_size(mesh: Mesh, rules: tuple) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: tuple, leading_dims: int = 0) -> NamedSharding:
    """Sharding for arrays whose first axis (after `leading_dims` unsharded ones) is the batch."""
    axes = batch_axes(rules)
    spec = (None,) * leading_dims + ((axes if axes else None),)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_tree, mesh: Mesh, rules: tuple):
    """Shardings for a pytree whose leaves may be boxed with logical axis names.

    Unboxed leaves (step counters, rng keys) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def with_mesh_rules(fn, mesh: Mesh, rules: tuple):
    """Call `fn` with the mesh and logical rules in scope, so that the models'
    `nn.with_logical_constraint` calls become real sharding constraints when traced."""
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)
    wrapped.inner = fn
    return wrapped
