"""The start-up table: parameter count, memory per device, and how the state is sharded."""

from __future__ import annotations

import collections
import math

import jax


def parameter_count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def bytes_per_device(abstract_tree) -> int:
    """Bytes of the largest shard of each leaf, summed: what one device holds."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def spec_summary(abstract_params) -> list[tuple[str, int, int]]:
    """(PartitionSpec, number of params arrays, elements) grouped by spec, largest first."""
    groups = collections.defaultdict(lambda: [0, 0])
    for leaf in jax.tree_util.tree_leaves(abstract_params):
        key = str(tuple(leaf.sharding.spec))
        groups[key][0] += 1
        groups[key][1] += math.prod(leaf.shape)
    return sorted(((k, n, e) for k, (n, e) in groups.items()), key=lambda row: -row[2])


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    raise AssertionError("unreachable")


def state_table(abstract_state, mesh) -> str:
    params = abstract_state.params
    lines = [
        f"parameters          {parameter_count(params):,}",
        f"params per device   {format_bytes(bytes_per_device(params))}",
        f"optimizer per device {format_bytes(bytes_per_device(abstract_state.opt_state))}",
        f"mesh                {', '.join(f'{k}={v}' for k, v in mesh.shape.items())}",
        "partition specs (arrays, elements):",
    ]
    lines += [f"  {spec:<36} {count:>4}  {elements:,}"
              for spec, count, elements in spec_summary(params)]
    return "\n".join(lines)
