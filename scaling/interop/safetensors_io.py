"""The safetensors format, read a slice at a time and written a tensor at a time.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw row-major bytes. Reading it ourselves lets an import read
exactly the rows and columns one process's devices hold (`TensorFiles.read`), counting every
byte, instead of mapping whole files; writing it ourselves streams a checkpoint out one
tensor at a time, so an export never holds the whole model in host memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from scaling.errors import UserError

# The float dtypes a checkpoint may store weights in; integer, boolean and 8-bit float
# tensors hold no weights we could load.
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20


class _File:
    """One .safetensors file: its parsed header, and reads of byte ranges from it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
                if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError("its header length is out of range")
                header = json.loads(f.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a safetensors file (its header is not an object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.tensors = {}
        for name, entry in header.items():
            try:
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
                dtype_name = str(entry["dtype"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}: the header entry of {name} is malformed") from None
            if dtype_name not in DTYPES:
                raise UserError(f"{path}: {name} is stored as {dtype_name}; weights must be one "
                                f"of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype_name]
            if end - begin != int(np.prod(shape)) * dtype.itemsize or \
                    begin < 0 or self.data_start + end > size:
                raise UserError(f"{path}: {name} claims bytes {begin}..{end}, which do not "
                                f"hold a {dtype_name}{list(shape)} inside the file; the file is "
                                "truncated or damaged")
            self.tensors[name] = (dtype, shape, begin)
        self._fd: int | None = None

    def pread(self, count: int, offset: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, count, self.data_start + offset)
        if len(data) != count:
            raise UserError(f"{self.path}: ended early; the file is truncated")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TensorFiles:
    """The tensors of a checkpoint directory, by name, over one file or an index of shards.

    Every header is read and checked up front, so a missing shard or a damaged header is
    refused before any weight is read. `bytes_read` counts the tensor bytes read since.
    """

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
        else:
            weight_map = None
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise UserError(f"{directory}: holds no *.safetensors weights (nor "
                                f"{INDEX_FILE}); PyTorch .bin checkpoints are not read")
        for name in files:
            if not (directory / name).is_file():
                raise UserError(f"{directory / name}: missing, but {INDEX_FILE} lists it; "
                                "download every shard")
        self.files = {name: _File(directory / name) for name in files}
        self.where: dict[str, _File] = {}
        for file in self.files.values():
            for tensor in file.tensors:
                self.where[tensor] = file
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in self.files[name].tensors:
                    raise UserError(f"{directory / name}: lacks {tensor}, which {INDEX_FILE} "
                                    "places there")
        self.bytes_read = 0

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].tensors[name][1]

    def read(self, name: str, rows: slice, cols: slice | None = None) -> np.ndarray:
        """Rows `rows` (and columns `cols` of a matrix) of tensor `name`, reading only those
        bytes: a run of whole rows at once, a column range row by row."""
        file = self.where[name]
        dtype, shape, begin = file.tensors[name]
        rows = range(*rows.indices(shape[0]))
        width = int(np.prod(shape[1:]))
        if cols is None or len(shape) == 1 or cols.indices(shape[1]) == (0, shape[1], 1):
            count = len(rows) * width * dtype.itemsize
            data = file.pread(count, begin + rows.start * width * dtype.itemsize)
            self.bytes_read += count
            return np.frombuffer(data, dtype).reshape((len(rows),) + shape[1:])
        start, stop, stride = cols.indices(shape[1])
        if stride != 1:
            raise ValueError("column slices are contiguous")
        count = (stop - start) * dtype.itemsize
        out = np.empty((len(rows), stop - start), dtype)
        for i, row in enumerate(rows):
            out[i] = np.frombuffer(file.pread(count, begin + (row * width + start)
                                              * dtype.itemsize), dtype)
        self.bytes_read += count * len(rows)
        return out

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def write(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
          produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file of `tensors` (name, shape, dtype), each made by `produce(name)`
    just before it is written; staged beside `path` and renamed into place when whole."""
    header, offset = {}, 0
    tensors = list(tensors)
    for name, shape, dtype in tensors:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype in tensors:
            value = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
            if value.shape != tuple(shape):
                raise ValueError(f"{name}: made {value.shape}, declared {tuple(shape)}")
            f.write(value.tobytes())
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
