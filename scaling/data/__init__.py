"""Datasets: loading, deterministic order and batching.

Nothing here imports JAX at module level, so a dataset can start loading while the rest of
the framework is still being imported (`read_ahead`).
"""

import sys
from pathlib import Path

import ml_collections
import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.data.tokenizer import TOKENIZER_DIR, Tokenizer, load_tokenizer, make_tokenizer
from scaling.errors import UserError

IMAGE_DATASETS = ("mnist", "fashion_mnist")
TEXT_DATASETS = ("tiny_shakespeare", "corpus")  # corpus: any data.sources
SFT_DATASETS = ("sft",)  # prompt/response pairs: scaling.data.sft


def _unknown(name: str) -> UserError:
    return UserError(f"--config.data.name={name}: unknown dataset; expected one of "
                     f"{', '.join(IMAGE_DATASETS + TEXT_DATASETS + SFT_DATASETS)}")


def load_dataset(config: ml_collections.ConfigDict) -> ArrayDataset:
    """The dataset named by `config.data.name`: images in memory, or a prepared text corpus."""
    if config.data.name in IMAGE_DATASETS:
        from scaling.data import images

        return images.load_image_dataset(config.data)
    if config.data.name in TEXT_DATASETS:
        from scaling.data import text

        return text.load_text_corpus(config)
    if config.data.name in SFT_DATASETS:
        from scaling.data import sft

        return sft.load_sft_dataset(config)
    raise _unknown(config.data.name)


def workdir_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Tokenizer:
    """The tokenizer saved in the workdir at training time, for sampling and serving.

    A workdir trained before tokenizers were saved has none; then a byte or SentencePiece
    tokenizer is rebuilt from the config, and a character vocabulary from the corpus, which
    must still be where the config says. It lives here, beside `load_dataset`, rather than in
    `tokenizer`, because that fallback loads the dataset, whose text loaders import `tokenizer`.
    """
    saved = load_tokenizer(Path(workdir) / TOKENIZER_DIR)
    if saved is not None:
        return saved
    data = config.data
    if data.tokenizer != "char":
        return make_tokenizer(data.tokenizer, "", data.tokenizer_model)
    print(f"note: {Path(workdir) / TOKENIZER_DIR} is absent (trained before tokenizers were "
          "saved); rebuilding the character vocabulary from the corpus", file=sys.stderr)
    try:
        return load_dataset(config).tokenizer
    except UserError as e:
        raise UserError(f"--workdir={workdir}: holds no saved tokenizer and the corpus that "
                        f"defines its character vocabulary cannot be loaded ({e}); make the "
                        "corpus available, or re-run training to save the tokenizer") from None


def read_ahead(config: ml_collections.ConfigDict) -> None:
    """Start reading the dataset's local files on a thread; `load_dataset` claims the result.

    Decompressing Fashion-MNIST takes 0.25 s, and zlib releases the GIL while it works, so
    started before the framework's imports it costs a run's start-up nothing.
    """
    if config.data.name in IMAGE_DATASETS:
        from scaling.data import idx_read_ahead

        idx_read_ahead.read_ahead(config.data)


def element_spec(config: ml_collections.ConfigDict) -> dict:
    """Shape and dtype of one training example, known without loading any data."""
    import jax

    if config.data.name in IMAGE_DATASETS:
        return {"image": jax.ShapeDtypeStruct((28, 28, 1), np.uint8),
                "label": jax.ShapeDtypeStruct((), np.int32)}
    if config.data.name in TEXT_DATASETS:
        window = jax.ShapeDtypeStruct((config.data.seq_len + 1,), np.int32)
        keys = ("tokens",) if config.data.packing == "concat" else (
            "tokens", "segment_ids", "positions")
        return dict.fromkeys(keys, window)
    if config.data.name in SFT_DATASETS:
        window = jax.ShapeDtypeStruct((config.data.seq_len + 1,), np.int32)
        return {**dict.fromkeys(("tokens", "segment_ids", "positions"), window),
                "weights": jax.ShapeDtypeStruct((config.data.seq_len,), np.float32)}
    raise _unknown(config.data.name)
