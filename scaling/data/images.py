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

import gzip
import logging
import os
import socket
import struct
import threading
import zlib
from concurrent.futures import Future
from pathlib import Path

import ml_collections
import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.errors import UserError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_IDX_FILES = tuple(name for pair in IDX_FILES.values() for name in pair)

WELL_KNOWN_DIRS = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}

LABEL_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}

# Where TFDS fetches each dataset (its url_checksums); checking the host first turns a
# several-minute retry loop offline into an immediate, clear error.
DOWNLOAD_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "tiny_shakespeare": ("raw.githubusercontent.com", 443),
}

# Prepared formats that TFDS reads by random access, without TensorFlow.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


# IDX files being read on a thread, by resolved path; `read_idx` claims each result once.
_read_ahead: dict[Path, Future] = {}


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file into a numpy array."""
    pending = _read_ahead.pop(path.resolve(), None)
    return pending.result() if pending is not None else _parse_idx(path)


def _gunzip(data: bytes) -> bytes:
    """`gzip.decompress`, but in one zlib call into a buffer sized from the gzip trailer, so
    the GIL is free for the whole inflate (read-ahead then costs the imports it overlaps
    nothing). A file of several gzip members takes the general path."""
    size = int.from_bytes(data[-4:], "little")  # ISIZE: the last member's length mod 2**32
    inflated = zlib.decompress(data, wbits=31, bufsize=max(size, 1))
    return inflated if len(inflated) == size else gzip.decompress(data)


def _parse_idx(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = _gunzip(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read IDX file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, "
                        f"found {body.size}; the file is truncated or corrupt")
    return body.reshape(shape)


def read_ahead(data_config: ml_collections.ConfigDict) -> None:
    """Start parsing the IDX files `load_image_dataset` will read first, on a daemon thread.

    Only local IDX directories are read ahead (the manual one, else the well-known ones when
    no TFDS directory is named); if the search then settles on a TFDS copy, the work is
    unused. Errors surface where the file is read, exactly as without read-ahead.
    """
    if data_config.manual_dir:
        directory = Path(data_config.manual_dir).expanduser()
        if not has_idx_files(directory):
            return
    elif not data_config.tfds_data_dir:
        directory = well_known_idx_directory(data_config.name)
        if directory is None:
            return
    else:
        return
    paths = [(directory / name).resolve() for name in ALL_IDX_FILES]
    futures = {path: Future() for path in paths if path not in _read_ahead}

    def parse_all():
        for path, future in futures.items():
            try:
                future.set_result(_parse_idx(path))
            except BaseException as e:  # handed to whoever reads the file
                future.set_exception(e)

    _read_ahead.update(futures)
    threading.Thread(target=parse_all, name="idx-read-ahead", daemon=True).start()


def has_idx_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ALL_IDX_FILES)


def well_known_idx_directory(name: str) -> Path | None:
    """The first folder where a system package puts the dataset's IDX files, if any."""
    return next((Path(d) for d in WELL_KNOWN_DIRS.get(name, ()) if has_idx_files(Path(d))),
                None)


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


def tfds_prepared_format(name: str, data_dir: str | None) -> str | None:
    """The file format of a prepared TFDS copy ("tfrecord", "array_record", ...), or None."""
    if not data_dir:
        # TFDS's default folder; when it has no such dataset, importing TFDS to ask (0.4 s of
        # every start) can be skipped.
        default = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        if "://" not in default and not (Path(default).expanduser() / name).is_dir():
            return None
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # an unprepared folder is expected here, not a warning
    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir or None)
        return builder.info.file_format.value if builder.is_prepared() else None
    except Exception:
        return None
    finally:
        absl_logger.setLevel(level)


def tfds_is_prepared(name: str, data_dir: str | None) -> bool:
    return tfds_prepared_format(name, data_dir) is not None


def tfds_readable(file_format: str | None) -> bool:
    return file_format is not None and (file_format in RANDOM_ACCESS_FORMATS
                                        or tensorflow_available())


def network_reachable(host: str = DOWNLOAD_HOSTS["mnist"][0], port: int = 443,
                      timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


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

