"""Serving: the standalone loader of an exported model and its HTTP server.

Nothing here imports flax, the experiment or the training code: jax and numpy only.
"""

from scaling.serving.artifact import ServedModel, load

__all__ = ["ServedModel", "load"]
