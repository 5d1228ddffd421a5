"""The device mesh, and the mapping from logical axis names to shardings.

Models only name axes logically (`batch`, `embed`, `mlp`, ...). The config's
`sharding_rules` map those names onto the mesh axes `data`, `fsdp`, `context` and `tensor`
(outermost to innermost: the innermost get the fastest links); this module
and the step builder are the only places that touch `jax.sharding`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from scaling.errors import UserError
from scaling.models import axes
from scaling.sharding import MESH_AXES


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
    sizes = {axis: int(mesh_config[f"dcn_{axis}"]) for axis in MESH_AXES}
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


def _rule_text(logical, physical) -> str:
    return f"({logical!r}, {physical!r})".replace("'", '"')


def _mesh_axes_of(logical, physical) -> tuple[str, ...]:
    """The mesh axes one rule names (None: replicated, one axis, or a tuple of them), each
    checked to exist."""
    if physical is None:
        return ()
    if not isinstance(physical, (str, tuple, list)):
        raise UserError(f"--config.sharding_rules: rule {_rule_text(logical, physical)} must "
                        "map to a mesh axis, a tuple of them, or None to replicate")
    names = (physical,) if isinstance(physical, str) else tuple(physical)
    for name in names:
        if name not in MESH_AXES:
            close = difflib.get_close_matches(str(name), MESH_AXES, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise UserError(f"--config.sharding_rules: rule {_rule_text(logical, physical)} "
                            f"names {name!r}, which is not a mesh axis; mesh axes: "
                            f"{', '.join(MESH_AXES)}, or None to replicate.{hint}")
    if len(set(names)) != len(names):
        raise UserError(f"--config.sharding_rules: rule {_rule_text(logical, physical)} "
                        "names a mesh axis twice")
    return names


def rules_from_config(config: ml_collections.ConfigDict,
                      model_axes: Collection[str] | None = None) -> tuple:
    """The config's rules as the tuple of (logical, mesh axes) pairs that flax expects.

    Every rule must name a mesh axis (data, fsdp, context, tensor) or None, the explicit
    "replicated".
    With `model_axes`, the logical names the model's params and activations use, the table
    is also checked against the model: each rule must name a built-in logical axis
    (`scaling.models.axes`) or one the model uses, and each name the model uses (and
    `batch`, which the step splits) must have a rule. Flax silently leaves a name with no
    rule unsharded, so a misspelt rule would otherwise replicate what it meant to split.
    """
    rules = []
    for rule in config.sharding_rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"--config.sharding_rules: rule {rule!r} is not a pair "
                            "(logical axis, mesh axes or None)")
        logical, physical = rule
        _mesh_axes_of(logical, physical)
        rules.append((logical, tuple(physical) if isinstance(physical, list) else physical))
    if model_axes is not None:
        check_rules_cover(tuple(rules), model_axes)
    return tuple(rules)


def check_rules_cover(rules: tuple, model_axes: Collection[str]) -> None:
    """Refuse rules that name no known logical axis, and used names that have no rule."""
    used = set(model_axes) | {axes.BATCH}
    known = sorted(set(axes.LOGICAL_AXES) | used)
    for logical, physical in rules:
        if logical not in known:
            close = difflib.get_close_matches(logical, known, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise UserError(f"--config.sharding_rules: rule {_rule_text(logical, physical)} "
                            f"names no logical axis; known: {', '.join(known)}.{hint}")
    covered = {logical for logical, _ in rules}
    missing = sorted(used - covered)
    if missing:
        raise UserError(
            f"--config.sharding_rules: no rule for the logical axis {missing[0]!r}, which the "
            f"model uses{' (as do ' + ', '.join(missing[1:]) + ')' if missing[1:] else ''}; "
            f"add a rule such as (\"{missing[0]}\", \"fsdp\") to split it, or "
            f"(\"{missing[0]}\", None) to replicate it")


def logical_names(tree) -> set[str]:
    """The logical axis names in a tree boxed by `nn.with_logical_partitioning`."""
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(tree),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    names = set()
    for spec in specs:
        if isinstance(spec, PartitionSpec):
            for entry in spec:
                entries = entry if isinstance(entry, tuple) else (entry,)
                names.update(e for e in entries if isinstance(e, str))
    return names


def rule_axes(rules: tuple, logical: str) -> tuple[str, ...]:
    """The mesh axes that the first rule for `logical` splits it over."""
    for name, physical in rules:
        if name == logical:
            if physical is None:
                return ()
            return (physical,) if isinstance(physical, str) else tuple(physical)
    return ()


def batch_axes(rules: tuple) -> tuple[str, ...]:
    """The mesh axes that the batch dimension is split over."""
    return rule_axes(rules, axes.BATCH)


def data_parallel_size(mesh: Mesh, rules: tuple) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def sequence_parallel_size(mesh: Mesh, rules: tuple) -> int:
    """Devices the sequence of activations is split over (context parallelism)."""
    return math.prod(mesh.shape[a] for a in rule_axes(rules, axes.SEQ))


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
