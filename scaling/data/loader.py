"""Per-process loading: only this process's rows of each global batch, read ahead.

Any dataset that answers `train_rows(seed, step, batch_size, rows)` (the in-memory image
sets, a prepared text corpus) is loaded the same way. The rows a process reads are those its
own devices hold, so a host never builds a whole global batch, and the batch at a step is the
same whatever the number of processes. Grain's thread prefetching reads up to
`prefetch_steps` steps ahead while the devices run, so host memory is bounded by that buffer,
not by the corpus. The time the loop spends waiting for data is counted in `wait_seconds`.

Evaluation streams the same way, in chunks of whole batches (`eval_chunks`), the last one
padded with a `mask` of 0, so every example counts exactly once and a split never has to sit
on the devices whole.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import numpy as np

EVAL_BATCHES_PER_CALL = 16


def _read_step(dataset, seed: int, batch_size: int, rows: np.ndarray, step: int) -> dict:
    return dataset.train_rows(seed, step, batch_size, rows)


class TrainLoader:
    """Steps [start_step, stop_step) of this process's rows, `prefetch_steps` read ahead by
    `threads` background threads (0 prefetch steps: read in the loop, when asked)."""

    def __init__(self, dataset, seed: int, batch_size: int, local_rows: np.ndarray,
                 start_step: int, stop_step: int, prefetch_steps: int, threads: int = 2):
        self.local_rows = local_rows
        self.read = functools.partial(_read_step, dataset, seed, batch_size, local_rows)
        self.step = start_step
        self.wait_seconds = 0.0
        self._iterator = None
        if prefetch_steps > 0 and stop_step > start_step:
            import grain

            steps = grain.MapDataset.range(start_step, stop_step).map(self.read)
            self._iterator = iter(steps.to_iter_dataset(grain.ReadOptions(
                num_threads=threads, prefetch_buffer_size=prefetch_steps)))

    def next(self, num_steps: int) -> dict[str, np.ndarray]:
        """The next `num_steps` steps' rows, stacked: (num_steps, local rows, ...)."""
        start = time.perf_counter()
        if self._iterator is None:
            items = [self.read(step) for step in range(self.step, self.step + num_steps)]
        else:
            items = [next(self._iterator) for _ in range(num_steps)]
        self.step += num_steps
        self.wait_seconds += time.perf_counter() - start
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    def take_wait_seconds(self) -> float:
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds


def eval_chunks(dataset, split: str, batch_size: int, local_rows: np.ndarray,
                batches_per_call: int = EVAL_BATCHES_PER_CALL) -> Iterator[dict]:
    """This process's rows of the split's evaluation batches, `batches_per_call` batches at a
    time (the last chunk padded with masked batches, so every chunk has one shape)."""
    size = dataset.eval_size(split)
    num_batches = max(-(-size // batch_size), 1)
    per_call = min(batches_per_call, num_batches)
    for first in range(0, num_batches, per_call):
        batches = np.arange(first, first + per_call)
        indices = batches[:, None] * batch_size + np.asarray(local_rows)[None, :]
        mask = indices < size
        rows = dataset.eval_rows(split, np.minimum(indices, size - 1).reshape(-1))
        chunk = {key: value.reshape(indices.shape + value.shape[1:])
                 for key, value in rows.items()}
        chunk["mask"] = mask
        yield chunk
