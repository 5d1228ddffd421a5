"""Text corpora as packed, fixed-length token sequences for language modelling.

`tiny_shakespeare` comes from TFDS, or offline from a manual directory holding TFDS's own
source file `input.txt`, split 90/5/5 into train/validation/test exactly as the TFDS builder
does. Training windows hold seq_len + 1 tokens at a stride of seq_len, so every token is a
target once per epoch; evaluation windows cover every target of a split exactly once, the
last one padded and weighted out.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.data.tfds_source import (
    DOWNLOAD_HOSTS,
    network_reachable,
    tensorflow_available,
    tfds_is_prepared,
)
from scaling.data.tokenizer import make_tokenizer
from scaling.errors import UserError

MANUAL_FILE = "input.txt"


def split_like_tfds(text: str) -> dict[str, str]:
    """The TFDS tiny_shakespeare split: the first 90% trains, the rest halves into val/test."""
    cut = int(len(text) * 0.9)
    train, rest = text[:cut], text[cut:]
    half = int(len(rest) * 0.5)
    return {"train": train, "validation": rest[:half], "test": rest[half:]}


def read_manual(directory: Path) -> dict[str, str]:
    path = directory / MANUAL_FILE
    if not path.is_file():
        raise UserError(f"--config.data.manual_dir={directory}: expected the file {MANUAL_FILE}")
    try:
        return split_like_tfds(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text: {e}") from None


def read_tfds(name: str, data_dir: str | None, download: bool) -> dict[str, str]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    if download:
        builder.download_and_prepare()
    splits = {}
    for split in ("train", "validation", "test"):
        texts = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["text"]
        splits[split] = "".join(t.decode("utf-8") for t in texts)
    return splits


def training_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise UserError(f"--config.data.seq_len={seq_len}: longer than the training text "
                        f"({len(tokens)} tokens)")
    starts = np.arange(count) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)]


def eval_windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Windows whose targets cover tokens[1:] exactly once; padding has weight 0."""
    num_targets = len(tokens) - 1
    count = -(-num_targets // seq_len)
    padded = np.zeros(count * seq_len + 1, np.int32)
    padded[:len(tokens)] = tokens
    starts = np.arange(count) * seq_len
    windows = padded[starts[:, None] + np.arange(seq_len + 1)]
    weights = (starts[:, None] + np.arange(seq_len)) < num_targets
    return {"tokens": windows, "weights": weights.astype(np.float32)}


def load_text_dataset(data_config: ml_collections.ConfigDict) -> ArrayDataset:
    name = data_config.name
    if data_config.manual_dir:
        texts = read_manual(Path(data_config.manual_dir).expanduser())
        source = f"{Path(data_config.manual_dir) / MANUAL_FILE}"
    elif tensorflow_available() and (tfds_is_prepared(name, data_config.tfds_data_dir)
                                     or network_reachable(*DOWNLOAD_HOSTS[name])):
        texts = read_tfds(name, data_config.tfds_data_dir, download=True)
        source = f"TFDS {name}"
    else:
        raise UserError(
            f"dataset {name} is not available: TFDS needs TensorFlow and the network to "
            f"prepare it. Options: set --config.data.manual_dir to a directory holding TFDS's "
            f"source file {MANUAL_FILE}; or set --config.data.tfds_data_dir to a TFDS data "
            f"directory and install TensorFlow (pip install 'scaling[tfds]') with network "
            f"access.")
    tokenizer = make_tokenizer(data_config.tokenizer, "".join(texts.values()),
                               data_config.tokenizer_model)
    seq_len = data_config.seq_len
    train = {"tokens": training_windows(tokenizer.encode(texts["train"]), seq_len)}
    eval_splits = {split: eval_windows(tokenizer.encode(texts[split]), seq_len)
                   for split in data_config.eval_splits}
    return ArrayDataset(name=name, train=train, eval_splits=eval_splits, label_names=(),
                        source=source, tokenizer=tokenizer)
