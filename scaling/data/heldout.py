"""A small sample of a classifier's eval splits, saved in the workdir when training starts.

Export checks its artifact's accuracy against the checkpoint. Loading the dataset for that
would read the whole training split, and would fail once the data has moved; a fixed sample
of each eval split, kept next to the checkpoints, lets the check run from the workdir alone.
The sample is a pure function of the split (a seeded choice of indices, kept in order), so
every start of a run writes the same file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.errors import UserError

FILE_NAME = "heldout_sample.npz"
SAMPLE_SIZE = 1000
KEYS = ("image", "label")  # what a classifier's split holds and export needs


def sample_indices(num_examples: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """`size` indices (all when the split is smaller), in their order in the split."""
    if num_examples <= size:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(0).choice(num_examples, size, replace=False))


def save_sample(dataset: ArrayDataset, workdir: Path, size: int = SAMPLE_SIZE) -> Path | None:
    """Write WORKDIR/heldout_sample.npz for an image classifier; None for other datasets.

    The file is written under a temporary name and renamed, so it is whole or absent.
    """
    splits = {name: data for name, data in dataset.eval_splits.items()
              if isinstance(data, dict) and all(key in data for key in KEYS)}
    if not splits:
        return None
    arrays = {}
    for name, data in splits.items():
        total = len(data["label"])
        indices = sample_indices(total, size)
        for key in KEYS:
            arrays[f"{name}/{key}"] = np.asarray(data[key])[indices]
        arrays[f"{name}/split_size"] = np.asarray(total)
    target = Path(workdir) / FILE_NAME
    partial = target.with_name(f".{FILE_NAME}.tmp-{os.getpid()}.npz")
    try:
        np.savez(partial, **arrays)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_sample(workdir: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """{split: {"image", "label", "split_size"}} from the workdir, or None if never saved."""
    path = Path(workdir) / FILE_NAME
    if not path.is_file():
        return None
    splits: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(path) as saved:
            for key in saved.files:
                split, field = key.rsplit("/", 1)
                splits.setdefault(split, {})[field] = saved[key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read the held-out sample ({e}); delete it, and "
                        "re-run training with the data available to save it again") from None
    return splits
