"""The classifier's deployable artifact: its format, the pixel rule and the top-k post-processing.

An artifact written by `--mode=export` is read and run here with jax and numpy alone, so a
deployment host needs neither flax nor the experiment code. That is why this package sits on
the bottom floor and imports nothing of ours but `scaling.errors`: `inference/` (which writes
and checks artifacts), `data/` (which holds image files to the same pixel rule) and `serving/`
(which answers requests with it) all import it downward.

    model = scaling.artifact.load("runs/fashion_mnist_mlp/export")
    model.predict(images, top_k=3)
"""

from scaling.artifact.loader import ServedModel, load

__all__ = ["ServedModel", "load"]
