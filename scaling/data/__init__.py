"""Datasets: loading, deterministic order and batching."""

import ml_collections

from scaling.data.dataset import ArrayDataset
from scaling.errors import UserError


def load_dataset(config: ml_collections.ConfigDict) -> ArrayDataset:
    """The dataset named by `config.data.name`, as in-memory arrays."""
    from scaling.data import images

    if config.data.name in images.LABEL_NAMES:
        return images.load_image_dataset(config.data)
    raise UserError(f"--config.data.name={config.data.name}: unknown dataset; expected one of "
                    f"{', '.join(images.LABEL_NAMES)}")


def element_spec(config: ml_collections.ConfigDict) -> dict:
    """Shape and dtype of one training example, known without loading any data."""
    import jax
    import numpy as np

    from scaling.data import images

    if config.data.name in images.LABEL_NAMES:
        return {"image": jax.ShapeDtypeStruct((28, 28, 1), np.uint8),
                "label": jax.ShapeDtypeStruct((), np.int32)}
    raise UserError(f"--config.data.name={config.data.name}: unknown dataset")
