"""In-memory datasets, their deterministic order, and the batches the steps consume.

The order of training examples is a pure function of (seed, step): resuming at step s sees
exactly the batches an uninterrupted run would. Batches come in chunks of k steps, stacked
along a leading axis, so one compiled call can run k steps. Evaluation pads the last batch
and carries a mask, so every example counts exactly once.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    name: str
    train: Batch
    eval_splits: dict[str, Batch]
    label_names: tuple[str, ...]
    source: str
    tokenizer: object = None  # text datasets only: ids <-> text, for sampling

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Whole batches per epoch; the shuffled remainder is left out of that epoch only."""
    return max(num_examples // batch_size, 1)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Example indices of the global batch at `step`."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    permutation = epoch_permutation(seed, epoch, num_examples)
    if batch_size > num_examples:  # a tiny dataset: wrap around inside one batch
        return np.resize(permutation, batch_size)
    return permutation[position * batch_size:(position + 1) * batch_size]


def train_chunk_indices(seed: int, start_step: int, num_steps: int, batch_size: int,
                        num_examples: int) -> np.ndarray:
    """(num_steps, batch_size) example indices: the global batches, whoever loads them."""
    return np.stack([train_indices(seed, s, batch_size, num_examples)
                     for s in range(start_step, start_step + num_steps)])


def train_chunk(data: Batch, seed: int, start_step: int, num_steps: int,
                batch_size: int) -> Batch:
    """Batches for steps [start_step, start_step + num_steps), stacked on a leading axis."""
    num_examples = len(next(iter(data.values())))
    indices = train_chunk_indices(seed, start_step, num_steps, batch_size, num_examples)
    return {key: value[indices] for key, value in data.items()}


def eval_chunk(data: Batch, batch_size: int) -> Batch:
    """All examples as (num_batches, batch_size, ...) with a `mask` marking the real ones."""
    num_examples = len(next(iter(data.values())))
    num_batches = -(-num_examples // batch_size)
    padded = num_batches * batch_size
    out = {}
    for key, value in data.items():
        pad = np.zeros((padded - num_examples,) + value.shape[1:], value.dtype)
        out[key] = np.concatenate([value, pad]).reshape((num_batches, batch_size)
                                                        + value.shape[1:])
    mask = np.arange(padded) < num_examples
    out["mask"] = mask.reshape(num_batches, batch_size)
    return out
