"""Python's cyclic garbage collector, off while a training run starts up.

Importing JAX, Flax and Optax and tracing the first programs leave about 230,000 objects
that live as long as the process, and little garbage (tracing leftovers: 0.1 MB for the
MLP, 24 MB of constants for the Shakespeare LM). Meanwhile the collector walks the growing
heap again and again: 0.07 s of a 1.0 s warm start of `fashion_mnist_mlp` on a 2-core CPU
(`bench/startup.py`). So `--mode=train` pauses it, and once the first step is reported,
while the device runs the next call, one full collection frees the leftovers and
`gc.freeze` moves the survivors out of its reach: later full collections skip them.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Undo `pause`; a no-op when nothing is paused, as in library use and tests."""
    global _paused
    if _paused:
        _paused = False
        gc.collect()
        gc.freeze()
        gc.enable()
