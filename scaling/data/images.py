"""MNIST-format image classification data as in-memory arrays.

TFDS is the source of truth. Because TFDS needs network access and TensorFlow to prepare
MNIST, the four IDX `.gz` files can also be read directly from a manual directory; Debian's
`dataset-fashion-mnist` location is found on its own. The search order is: an explicit
manual directory, an already-prepared TFDS copy, a well-known local copy, a TFDS download.

A prepared TFDS copy in `array_record` format (`download_and_prepare(file_format=
"array_record")`) is read without TensorFlow (Pillow decodes its PNGs); the default `tfrecord`
format needs TensorFlow. TFDS shuffles examples when it prepares them, so a TFDS copy holds the
same examples as the IDX files in a different order, and the same seed gives different batches.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.data.idx import (
    ALL_IDX_FILES,
    IDX_FILES,
    has_idx_files,
    read_idx,
    well_known_idx_directory,
)
from scaling.data.tfds_source import (
    DOWNLOAD_HOSTS,
    RANDOM_ACCESS_FORMATS,
    network_reachable,
    tensorflow_available,
    tfds_prepared_format,
    tfds_readable,
)
from scaling.errors import UserError

LABEL_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}


def load_idx_directory(directory: Path, name: str) -> ArrayDataset:
    splits = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        images = read_idx(directory / images_file)
        labels = read_idx(directory / labels_file)
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"{directory}: {images_file} has {images.shape[0]} images but "
                            f"{labels_file} has {labels.shape[0]} labels")
        splits[split] = {"image": images[..., None], "label": labels.astype(np.int32)}
    return ArrayDataset(
        name=name, train=splits["train"], eval_splits={"test": splits["test"]},
        label_names=LABEL_NAMES.get(name, tuple(str(i) for i in range(10))),
        source=f"IDX files in {directory}")


def read_data_source(builder, split: str) -> dict[str, np.ndarray]:
    """One split of an array_record/parquet copy, decoded by TFDS without TensorFlow."""
    source = builder.as_data_source(split=split)
    try:
        examples = source.__getitems__(range(len(source)))
    except ImportError as e:  # TFDS decodes PNG with OpenCV or Pillow when TF is absent
        raise UserError(f"reading TFDS {builder.name} from {builder.data_dir} needs Pillow to "
                        f"decode its images (pip install pillow): {e}") from None
    return {key: np.stack([example[key] for example in examples]) for key in ("image", "label")}


def load_tfds(name: str, data_dir: str | None, download: bool) -> ArrayDataset:
    """Whole splits as numpy arrays through TFDS: tfrecord copies need TensorFlow to read them,
    array_record and parquet copies do not."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    if download:
        builder.download_and_prepare()
    random_access = builder.info.file_format.value in RANDOM_ACCESS_FORMATS
    splits = {}
    for split in ("train", "test"):
        if random_access:
            arrays = read_data_source(builder, split)
        else:
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        splits[split] = {"image": np.asarray(arrays["image"], np.uint8),
                         "label": np.asarray(arrays["label"], np.int32)}
    names = tuple(builder.info.features["label"].names)
    return ArrayDataset(name=name, train=splits["train"], eval_splits={"test": splits["test"]},
                        label_names=names, source=f"TFDS {name} in {builder.data_dir}")


def load_image_dataset(data_config: ml_collections.ConfigDict) -> ArrayDataset:
    """Find the dataset by the search order in the module docstring, or explain what is left."""
    name = data_config.name
    if name not in LABEL_NAMES:
        raise UserError(f"--config.data.name={name}: expected one of {', '.join(LABEL_NAMES)}")
    if data_config.manual_dir:
        directory = Path(data_config.manual_dir).expanduser()
        if not has_idx_files(directory):
            wanted = ", ".join(ALL_IDX_FILES)
            raise UserError(f"--config.data.manual_dir={directory}: expected the four IDX files "
                            f"{wanted}")
        return load_idx_directory(directory, name)
    prepared = tfds_prepared_format(name, data_config.tfds_data_dir)
    if tfds_readable(prepared):
        return load_tfds(name, data_config.tfds_data_dir, download=False)
    directory = well_known_idx_directory(name)
    if directory is not None:
        return load_idx_directory(directory, name)
    missing = []
    if prepared:
        missing.append(f"the TFDS copy in --config.data.tfds_data_dir is in {prepared} format, "
                       f"which needs TensorFlow to read (pip install 'scaling[tfds]'; or "
                       f"prepare it with file_format='array_record')")
    elif not tensorflow_available():
        missing.append("TensorFlow is not installed, and TFDS needs it to prepare the data "
                       "(pip install 'scaling[tfds]')")
    host, port = DOWNLOAD_HOSTS[name]
    if not network_reachable(host, port):
        missing.append(f"there is no network ({host} is unreachable)")
    if not missing:
        return load_tfds(name, data_config.tfds_data_dir, download=True)
    debian = (" On Debian, `apt-get install dataset-fashion-mnist` provides "
              "/usr/share/datasets/fashion-mnist." if name == "fashion_mnist" else "")
    raise UserError(
        f"dataset {name} is not available: {'; '.join(missing)}. Options: connect to the "
        f"network so TFDS can download it; or set --config.data.tfds_data_dir to a TFDS data "
        f"directory where {name} is already prepared (a local path or a gs:// bucket); or set "
        f"--config.data.manual_dir to a directory holding the four IDX .gz files "
        f"(train-images-idx3-ubyte.gz, ...).{debian}")

