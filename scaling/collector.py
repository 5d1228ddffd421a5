"""Python's cyclic garbage collector, off while a run starts up.

Importing JAX, Flax and Optax and tracing the first programs leave about 230,000 objects
that live as long as the process, and make almost no garbage (about a thousand objects in
reference cycles). The collector walks the growing heap again and again meanwhile: about
0.07 s of a 1.0 s warm start of `fashion_mnist_mlp` on a 2-core CPU (`bench/startup.py`).
So `scaling.main` pauses it until the training loop starts, then freezes what start-up left
(Python's `gc.freeze`) and turns it back on: later full collections skip those objects,
40 ms each that training no longer pays either.
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
        gc.freeze()
        gc.enable()
