"""Image files (PNG, JPEG, NPY) as arrays shaped and typed like a dataset's stored examples.

Prediction must see exactly what training saw: uint8 pixels in the stored layout, which the
task's own preprocessing then scales. So files are decoded to that layout and nothing else:
colour is converted to grayscale for a one-channel dataset, but an image of the wrong size is
refused rather than resized, because training never resized anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling.artifact.pixels import as_pixel_batch
from scaling.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy",)
# Pillow modes that convert to 8-bit channels without losing range (16-bit and float do not).
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def list_input_files(path: Path, flag: str) -> list[Path]:
    """A single file, or the image and array files directly inside a directory, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
        if not files:
            raise UserError(f"{flag}: the directory {path} holds no PNG, JPEG or NPY files")
        return files
    if not path.exists():
        raise UserError(f"{flag}: no such file or directory {path}; give an image, a "
                        "directory of images, or split:NAME")
    if path.suffix.lower() not in IMAGE_SUFFIXES + ARRAY_SUFFIXES:
        raise UserError(f"{flag}: {path} is not a PNG, JPEG or NPY file")
    return [path]


def read_image(path: Path, shape: tuple[int, ...], flag: str) -> np.ndarray:
    """One PNG or JPEG as a uint8 array of `shape` (height, width, channels)."""
    from PIL import Image, UnidentifiedImageError

    height, width, channels = shape
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in EIGHT_BIT_MODES:
                raise UserError(f"{flag}: {path} has {image.mode} pixels; expected 8-bit "
                                "grayscale or colour like the training images")
            if image.size != (width, height):
                raise UserError(f"{flag}: {path} is {image.size[0]}x{image.size[1]}; the model "
                                f"takes {width}x{height} images, as it was trained")
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"{flag}: {path} is not a readable image") from None
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path}: {e}") from None
    return pixels.reshape(shape)


def read_array(path: Path, shape: tuple[int, ...], flag: str) -> np.ndarray:
    """An NPY file holding one image or a stack of them, as uint8 of shape (n, *shape)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot read {path} as an NPY array: {e}") from None
    try:
        return as_pixel_batch(array, shape, allow_single=True)
    except ValueError as e:
        raise UserError(f"{flag}: {path}: {e}") from None


def read_inputs(path: Path, shape: tuple[int, ...], flag: str) -> tuple[list[str], np.ndarray]:
    """Every image under `path`, with a name for each: the file, or `file.npy[i]` in a stack."""
    names, arrays = [], []
    for file in list_input_files(path, flag):
        if file.suffix.lower() in ARRAY_SUFFIXES:
            stack = read_array(file, shape, flag)
            names += [str(file)] if len(stack) == 1 else [f"{file}[{i}]" for i in
                                                            range(len(stack))]
            arrays.append(stack)
        else:
            names.append(str(file))
            arrays.append(read_image(file, shape, flag)[None])
    images = np.concatenate(arrays)
    if not len(images):
        raise UserError(f"{flag}: no images found in {path}")
    return names, images
