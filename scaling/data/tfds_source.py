"""TFDS as a source: whether a prepared copy exists, can be read without TensorFlow, or can
still be downloaded. Checking first turns a several-minute retry loop offline into one clear
error naming the options.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

# Where TFDS fetches each dataset (its url_checksums); checking the host first turns a
# several-minute retry loop offline into an immediate, clear error.
DOWNLOAD_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "tiny_shakespeare": ("raw.githubusercontent.com", 443),
}

# Prepared formats that TFDS reads by random access, without TensorFlow.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


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


