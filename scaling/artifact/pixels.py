"""The one rule for what counts as a batch of images: uint8 pixels in the stored layout.

Files given to `--mode=predict` and JSON sent to the server are held to the same rule, so a
request the server accepts is exactly one that predict would accept. Only numpy here, because
the artifact's loader, which a deployment host runs without flax, imports it.
"""

from __future__ import annotations

import numpy as np


def as_pixel_batch(array: np.ndarray, shape: tuple[int, ...], *,
                   allow_single: bool = False) -> np.ndarray:
    """`array` as uint8 of shape (n, *shape), or ValueError saying what is wrong with it.

    A trailing channel axis of size 1 may be left out. Values must be integers 0 to 255, as
    the datasets store them; floats are refused rather than guessed at, since [0, 1] and
    [0, 255] floats both occur in the wild. With `allow_single`, one unbatched image is
    accepted too.
    """
    shape = tuple(shape)
    layouts = [shape] + ([shape[:-1]] if shape and shape[-1] == 1 else [])
    if allow_single and array.shape in layouts:
        array = array[None]
    if array.ndim < 1 or array.shape[1:] not in layouts:
        wanted = " or ".join(f"[n, {', '.join(map(str, layout))}]" for layout in layouts)
        single = f", or one image {list(shape)}" if allow_single else ""
        raise ValueError(f"got an array of shape {list(array.shape)}; expected n images, "
                         f"{wanted}{single}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"got {array.dtype} values; expected integer pixels 0 to 255 (uint8)")
    if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("got values outside 0 to 255; expected uint8 pixels")
    return array.astype(np.uint8, copy=False).reshape((len(array),) + shape)


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """`images` grown to `size` rows with zeros, so batches compile to a few fixed shapes;
    a full batch is passed through without a copy."""
    if len(images) == size:
        return images
    padded = np.zeros((size,) + images.shape[1:], images.dtype)
    padded[:len(images)] = images
    return padded
