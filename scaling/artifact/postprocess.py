"""Post-processing: class probabilities to the argmax label and the top-k classes, by name.

Shared by `--mode=predict`, the standalone loader and the HTTP server, so a prediction reads
the same wherever it is made. Only numpy here: the artifact's loader must stay light.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_TOP_K = 3  # classes reported per prediction unless asked otherwise


def label_name(label_names: Sequence[str], label: int) -> str:
    """The dataset's name for a class, or its number where the dataset names none."""
    return label_names[label] if label < len(label_names) else str(label)


def resolve_top_k(top_k: int, num_classes: int, flag: str = "--top_k") -> int:
    """0 means every class, as in sampling; anything else must be a real count of classes.

    Raises ValueError naming `flag`, which callers turn into their own kind of error.
    """
    if top_k < 0 or top_k > num_classes:
        raise ValueError(f"{flag}={top_k}: the model has {num_classes} classes; choose 1 to "
                         f"{num_classes}, or 0 for all of them")
    return top_k or num_classes


def top_k_records(labels: np.ndarray, probabilities: np.ndarray, top_k: int,
                  label_names: Sequence[str]) -> list[dict]:
    """One JSON-ready record per example: its label and its k most likely classes.

    Ties keep the lower class first (a stable sort), as `argmax` does.
    """
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    records = []
    for label, row, classes in zip(labels, probabilities, order, strict=True):
        records.append({
            "label": int(label), "name": label_name(label_names, int(label)),
            "top_k": [{"label": int(c), "name": label_name(label_names, int(c)),
                       "probability": float(row[c])} for c in classes]})
    return records
