"""Our transformer's params as Hugging Face tensors: the name map, and the layout of each.

Hugging Face stores a linear layer as (out, in) and a projection's heads flattened into its
rows; our params are (in, out) with heads as their own axes, and every layer's params are
stacked along a leading `layers` axis. Each of our params names the tensor it comes from
(with `{i}` for the layer) and one of five layouts:

    same       the same array (norm scales; the embedding, whose extra rows, if our
               vocabulary is padded, are zeros)
    transpose  (in, out) from (out, in): the MLP and the untied output layer
    heads_in   (D, N, Dh) from (N·Dh, D): query, key and value
    heads_out  (H, Dh, D) from (D, H·Dh): the attention output
    heads_bias (N, Dh) from (N·Dh,): Qwen2's query, key and value biases

The layouts are pure permutations, so an export followed by an import is bitwise.
`read_params` builds every param straight into its sharding: each device's block is read
from its rows and columns of the file, so a process reads only what its devices hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from scaling.errors import UserError
from scaling.interop.safetensors_io import TensorFiles

LAYER_PREFIX = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class Mapped:
    path: tuple[str, ...]   # in our params tree
    name: str               # the Hugging Face tensor; `{i}` is the layer
    layout: str

    @property
    def layered(self) -> bool:
        return self.path[0] == "layers"


def mapping(model_config) -> list[Mapped]:
    m = model_config
    rows = [Mapped(("embedding",), "model.embed_tokens.weight", "same"),
            Mapped(("final_norm", "scale"), "model.norm.weight", "same")]
    if not m.tie_embeddings:
        rows.append(Mapped(("output",), "lm_head.weight", "transpose"))
    layer = [(("attention_norm", "scale"), "input_layernorm.weight", "same"),
             (("mlp_norm", "scale"), "post_attention_layernorm.weight", "same"),
             (("attention", "query"), "self_attn.q_proj.weight", "heads_in"),
             (("attention", "key"), "self_attn.k_proj.weight", "heads_in"),
             (("attention", "value"), "self_attn.v_proj.weight", "heads_in"),
             (("attention", "out"), "self_attn.o_proj.weight", "heads_out"),
             (("mlp", "gate"), "mlp.gate_proj.weight", "transpose"),
             (("mlp", "up"), "mlp.up_proj.weight", "transpose"),
             (("mlp", "down"), "mlp.down_proj.weight", "transpose")]
    if m.qkv_bias:
        layer += [(("attention", f"{p}_bias"), f"self_attn.{p[0]}_proj.bias", "heads_bias")
                  for p in ("query", "key", "value")]
    rows += [Mapped(("layers", *path), LAYER_PREFIX + name, layout)
             for path, name, layout in layer]
    return rows


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face tensor's shape for one layer of ours."""
    if layout == "same":
        return shape
    if layout == "transpose":
        return shape[::-1]
    if layout == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_out":
        return (shape[2], shape[0] * shape[1])
    return (shape[0] * shape[1],)  # heads_bias


def to_hf(layout: str, value: np.ndarray) -> np.ndarray:
    """One layer of ours, laid out as Hugging Face stores it."""
    if layout == "same":
        return value
    if layout == "transpose":
        return value.T
    if layout == "heads_in":
        return value.reshape(value.shape[0], -1).T
    if layout == "heads_out":
        return value.reshape(-1, value.shape[2]).T
    return value.reshape(-1)


def _read_block(files: TensorFiles, name: str, layout: str, index: tuple[slice, ...],
                shape: tuple[int, ...]) -> np.ndarray:
    """Our block `index` (one layer) of a param of `shape`, read from tensor `name`."""
    spans = [range(*s.indices(n)) for s, n in zip(index, shape, strict=True)]
    if layout == "same":
        # The embedding may have more rows than the file (a padded vocabulary).
        have = files.shape(name)[0]
        inside = range(spans[0].start, min(spans[0].stop, have))
        block = np.zeros([len(s) for s in spans], files.where[name].tensors[name][0])
        if len(inside):
            block[:len(inside)] = files.read(name, slice(inside.start, inside.stop),
                                             index[1] if len(shape) > 1 else None)
        return block
    if layout == "transpose":
        # The untied output layer's columns may pass the file's rows (a padded vocabulary).
        have = files.shape(name)[0]
        inside = range(spans[1].start, min(spans[1].stop, have))
        block = np.zeros([len(s) for s in spans], files.where[name].tensors[name][0])
        if len(inside):
            block[:, :len(inside)] = files.read(name, slice(inside.start, inside.stop),
                                                index[0]).T
        return block
    head_dim = shape[-1] if layout == "heads_bias" else shape[1 if layout == "heads_out" else 2]
    if layout == "heads_in":  # (D, N, Dh) from rows n·Dh+e, columns d
        d, n, e = spans
        rows = files.read(name, slice(n.start * head_dim, n.stop * head_dim), index[0])
        return rows.reshape(len(n), head_dim, len(d))[:, e.start:e.stop].transpose(2, 0, 1)
    if layout == "heads_out":  # (H, Dh, D) from rows d, columns h·Dh+e
        n, e, d = spans
        rows = files.read(name, index[2], slice(n.start * head_dim, n.stop * head_dim))
        return rows.reshape(len(d), len(n), head_dim)[:, :, e.start:e.stop].transpose(1, 2, 0)
    n, e = spans  # heads_bias: (N, Dh) from n·Dh+e
    flat = files.read(name, slice(n.start * head_dim, n.stop * head_dim))
    return flat.reshape(len(n), head_dim)[:, e.start:e.stop]


def check_tensors(files: TensorFiles, model_config, abstract_params, hf_vocab: int,
                  directory) -> None:
    """Every tensor the model needs is present with the shape our params imply (with the
    checkpoint's own vocabulary, which ours may pad); none is left over (a left-over tensor
    is a feature of the architecture we would drop)."""
    expected = {}
    for row in mapping(model_config):
        shape = list(leaf_at(abstract_params, row.path).shape[1 if row.layered else 0:])
        if row.path in (("embedding",), ("output",)):
            shape[0 if row.path == ("embedding",) else 1] = hf_vocab
        for i in range(model_config.num_layers) if row.layered else [None]:
            expected[row.name.format(i=i)] = hf_shape(row.layout, tuple(shape))
    present = files.names()
    for name, shape in expected.items():
        if name not in present:
            raise UserError(f"{directory}: no tensor {name} in any *.safetensors file; the "
                            "checkpoint is incomplete or of another architecture")
        if files.shape(name) != shape:
            raise UserError(f"{files.where[name].path}: {name} is {list(files.shape(name))}, "
                            f"but config.json implies {list(shape)}")
    extra = sorted(present - expected.keys() - {
        n for n in present if n.endswith("rotary_emb.inv_freq")})  # older exports keep these
    if extra:
        raise UserError(f"{directory}: tensors this model has no place for, e.g. {extra[0]} "
                        f"({len(extra)} in all); the architecture is not supported")


def leaf_at(params, path: tuple[str, ...]):
    for key in path:
        params = params[key]
    return params


def read_params(files: TensorFiles, model_config, abstract_params) -> dict:
    """Every param of `abstract_params` (ShapeDtypeStructs with shardings), read from
    `files` into its sharding; only the blocks of this process's devices are read, each
    once, and cast to the param's dtype."""
    out: dict = {}
    for row in mapping(model_config):
        target = leaf_at(abstract_params, row.path)
        blocks: dict = {}

        def block(index, row=row, target=target, blocks=blocks):
            key = tuple((s.start, s.stop) for s in index)
            if key not in blocks:
                if row.layered:
                    layers = range(*index[0].indices(target.shape[0]))
                    pieces = [_read_block(files, row.name.format(i=i), row.layout, index[1:],
                                          target.shape[1:]) for i in layers]
                    value = np.stack(pieces)
                else:
                    value = _read_block(files, row.name, row.layout, index, target.shape)
                blocks[key] = value.astype(target.dtype)
            return blocks[key]

        node = out
        for key in row.path[:-1]:
            node = node.setdefault(key, {})
        node[row.path[-1]] = jax.make_array_from_callback(target.shape, target.sharding, block)
    return out


def hf_tensors(model_config) -> Iterator[tuple[str, str, tuple[str, ...], int | None]]:
    """(tensor name, layout, our path, layer or None) of every tensor an export writes."""
    for row in mapping(model_config):
        if row.layered:
            for i in range(model_config.num_layers):
                yield row.name.format(i=i), row.layout, row.path, i
        else:
            yield row.name, row.layout, row.path, None
