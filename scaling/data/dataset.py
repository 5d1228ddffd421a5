"""In-memory datasets (the image sets) and their deterministic order.

The order of training examples is a pure function of (seed, step): resuming at step s sees
exactly the batches an uninterrupted run would. `scaling.data.loader` reads the rows of each
batch that a process needs, from this or from a prepared text corpus alike.
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
    # Rows are copies from memory: reading ahead on threads would gain nothing, and the
    # thread pool's import (Grain) would cost every start 0.3 s.
    streamed = False

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))

    def train_rows(self, seed: int, step: int, batch_size: int,
                   rows: np.ndarray) -> Batch:
        """Rows `rows` of the global batch at `step` (the loader's view of any dataset)."""
        indices = train_indices(seed, step, batch_size, self.num_train)[rows]
        return {key: value[indices] for key, value in self.train.items()}

    def eval_size(self, split: str) -> int:
        return len(next(iter(self.eval_splits[split].values())))

    def eval_rows(self, split: str, indices: np.ndarray) -> Batch:
        return {key: value[indices] for key, value in self.eval_splits[split].items()}


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
