"""The IDX format of MNIST-style datasets: parsing, and where system packages put the files.

Parsing is strict (magic, shape, length), so a truncated or foreign file is one clear error
rather than a reshape failure far from its cause.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from concurrent.futures import Future
from pathlib import Path

import numpy as np

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


# IDX files being parsed ahead of need, by resolved path. `idx_read_ahead` fills it while the
# framework imports; `read_idx` hands each result out once. It lives here, with the reader,
# so the read-ahead module imports this one and never the other way round.
pending_reads: dict[Path, Future] = {}


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file into a numpy array, or claim the copy that
    `idx_read_ahead` parsed while the framework was importing."""
    pending = pending_reads.pop(path.resolve(), None)
    return pending.result() if pending is not None else parse_idx(path)


def _gunzip(data: bytes) -> bytes:
    """`gzip.decompress`, but in one zlib call into a buffer sized from the gzip trailer, so
    the GIL is free for the whole inflate (read-ahead then costs the imports it overlaps
    nothing). A file of several gzip members takes the general path."""
    size = int.from_bytes(data[-4:], "little")  # ISIZE: the last member's length mod 2**32
    inflated = zlib.decompress(data, wbits=31, bufsize=max(size, 1))
    return inflated if len(inflated) == size else gzip.decompress(data)


def parse_idx(path: Path) -> np.ndarray:
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


def has_idx_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ALL_IDX_FILES)


def well_known_idx_directory(name: str) -> Path | None:
    """The first folder where a system package puts the dataset's IDX files, if any."""
    return next((Path(d) for d in WELL_KNOWN_DIRS.get(name, ()) if has_idx_files(Path(d))),
                None)


