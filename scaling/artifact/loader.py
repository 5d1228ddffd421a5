"""The standalone loader: run an exported model with jax and numpy alone.

    model = scaling.artifact.load("runs/fashion_mnist_mlp/export")
    model.predict(images, top_k=3)   # uint8 images, shape (n, 28, 28, 1) or (n, 28, 28)

A deployment host needs neither flax nor the experiment code nor the training data: the
artifact directory written by `--mode=export` holds everything.

- `model.jax_export`: the `jax.export` serialization of one function, (weights, images) ->
  (labels, probabilities), as StableHLO with a symbolic batch dimension, lowered for CPU, CUDA
  and TPU. Preprocessing is inside it, so raw pixels go in exactly as the dataset stores them.
- `weights.npz`: its weight arguments, flat in the function's argument order. They sit beside
  the function rather than inside it as constants, so the serialized module stays small
  whatever the model's size (a protocol buffer stops at 2 GiB).
- `metadata.json`: the input spec, the preprocessing, label names, the checkpoint step and,
  after quantization, the accuracy measured against the checkpoint.

Each call pads its batch to a power of two (up to `max_batch_size`), so at most about
log2(max_batch_size) shapes ever compile however requests are sized.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax import export as jax_export

from scaling.artifact.pixels import as_pixel_batch, pad_batch
from scaling.artifact.postprocess import DEFAULT_TOP_K, resolve_top_k, top_k_records
from scaling.errors import UserError

FUNCTION_FILE = "model.jax_export"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "metadata.json"
FORMAT = "scaling-export-1"


class InvalidInput(ValueError):
    """Inputs that do not fit the artifact's input spec; a server answers them with a 400."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class ServedModel:
    """An exported model on this host's default device, ready to predict."""

    def __init__(self, directory: Path, max_batch_size: int | None = None):
        self.directory = directory
        self.metadata = _read_metadata(directory)
        exported = _read_function(directory)
        platform = jax.default_backend()
        if platform not in exported.platforms:
            raise UserError(f"{directory}: the artifact was exported for "
                            f"{', '.join(exported.platforms)}, not for this host's {platform}")
        weights = _read_weights(directory, exported.in_avals[:-1])
        self._in_tree = exported.in_tree
        self._weights = [jax.device_put(w) for w in weights]
        self._call = jax.jit(exported.call)
        spec = self.metadata["input"]
        self.input_shape = tuple(spec["shape"])
        self.label_names: tuple[str, ...] = tuple(self.metadata["label_names"])
        self.num_classes = int(self.metadata["num_classes"])
        self.max_batch_size = int(max_batch_size or self.metadata["batch_size"])
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size={self.max_batch_size}: must be positive")

    def as_batch(self, instances) -> np.ndarray:
        """Nested lists (parsed JSON) or an array, checked against the input spec."""
        if not isinstance(instances, np.ndarray):
            if not isinstance(instances, list) or not instances:
                raise InvalidInput("instances: expected a non-empty list of images")
            try:
                instances = np.asarray(instances)
            except ValueError:
                raise InvalidInput(f"instances: ragged lists; every image must have shape "
                                   f"{list(self.input_shape)}") from None
        try:
            return as_pixel_batch(instances, self.input_shape)
        except ValueError as e:
            raise InvalidInput(f"instances: {e}") from None

    def predict_arrays(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) for a batch of images of any size."""
        images = self.as_batch(images)
        pending = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start:start + self.max_batch_size]
            size = next(b for b in batch_buckets(self.max_batch_size) if b >= len(chunk))
            pending.append((len(chunk), self._run(pad_batch(chunk, size))))  # read below
        outputs = [(n, jax.device_get(out)) for n, out in pending]
        return (np.concatenate([out["label"][:n] for n, out in outputs]),
                np.concatenate([out["probabilities"][:n] for n, out in outputs]))

    def predict(self, images, top_k: int = DEFAULT_TOP_K) -> list[dict]:
        """One record per image: the label, its name, and the top-k classes by probability
        (0 for all of them)."""
        top_k = resolve_top_k(top_k, self.num_classes, "top_k")
        labels, probabilities = self.predict_arrays(images)
        return top_k_records(labels, probabilities, top_k, self.label_names)

    def warm_up(self, sizes: Sequence[int] | None = None) -> None:
        """Compile every batch shape now, so the first requests do not pay for it."""
        for size in sizes or batch_buckets(self.max_batch_size):
            jax.block_until_ready(self._run(np.zeros((size,) + self.input_shape, np.uint8)))

    def _run(self, images: np.ndarray):
        args, kwargs = jax.tree_util.tree_unflatten(self._in_tree, [*self._weights, images])
        return self._call(*args, **kwargs)


def load(path: str | Path, max_batch_size: int | None = None) -> ServedModel:
    """The exported model in directory `path` (written by `--mode=export`)."""
    directory = Path(path).expanduser()
    if not (directory / METADATA_FILE).is_file():
        raise UserError(f"{directory}: not an exported model (no {METADATA_FILE}); write one "
                        "with --mode=export")
    return ServedModel(directory, max_batch_size)


def _read_metadata(directory: Path) -> dict:
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory / METADATA_FILE}: cannot read it: {e}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"{directory / METADATA_FILE}: not a {FORMAT} artifact; export it "
                        "again with this version of scaling")
    return metadata


def _read_function(directory: Path):
    try:
        return jax_export.deserialize(bytearray((directory / FUNCTION_FILE).read_bytes()))
    except OSError as e:
        raise UserError(f"{directory / FUNCTION_FILE}: cannot read it: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise UserError(f"{directory / FUNCTION_FILE}: not a jax.export serialization "
                        f"({type(e).__name__}: {e}); export it again") from None


def _read_weights(directory: Path, avals) -> list[np.ndarray]:
    """The weight arrays in argument order, checked against what the function expects."""
    path = directory / WEIGHTS_FILE
    try:
        with np.load(path, allow_pickle=False) as archive:
            weights = [archive[key] for key in sorted(archive.files)]
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it: {e}") from None
    found = [(w.shape, w.dtype) for w in weights]
    wanted = [(tuple(a.shape), np.dtype(a.dtype)) for a in avals]
    if found != wanted:
        raise UserError(f"{path}: its {len(found)} arrays do not match the {len(wanted)} "
                        f"weights that {FUNCTION_FILE} takes; export the model again")
    return weights
