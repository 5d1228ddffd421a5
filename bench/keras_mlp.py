"""The founding document's Keras MLP, timed per epoch: the baseline `mlp_epoch.py` runs.

TensorFlow changes what other code in the framework's environment does, so it lives in its
own virtualenv and this script runs there, as a subprocess of the benchmark:

    python -m venv --system-site-packages /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow-cpu
    /work/venv-tf/bin/python bench/keras_mlp.py --data=ARRAYS.npz --epochs=10 --json=OUT.json

ARRAYS.npz holds `train_x` (float32, N×784, in [0, 1]), `train_y` (int), `test_x` and
`test_y`, exactly what the other contenders train on; they go in as 28×28 images, as in the
document. The model and training are the
document's: Flatten, Dense 128 relu, Dense 128 relu, Dense 10, Adam, `model.fit(batch_size=128)`
with Keras's default shuffling, all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out

import numpy as np  # noqa: E402


def train(data: dict[str, np.ndarray], epochs: int, batch_size: int) -> dict:
    """Trains the document's model; epoch times come from a callback, so fit's set-up is not
    in them and epoch 1 includes tracing, as the framework's includes compilation."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    class EpochClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter())

    images = {split: data[f"{split}_x"].reshape(-1, 28, 28) for split in ("train", "test")}
    clock = EpochClock()
    model.fit(images["train"], data["train_y"], batch_size=batch_size, epochs=epochs,
              callbacks=[clock], verbose=0)
    _, accuracy = model.evaluate(images["test"], data["test_y"], batch_size=1024, verbose=0)
    return {"epoch_seconds": np.diff(clock.times).tolist(), "test_accuracy": float(accuracy),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the arrays, as .npz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    args = parser.parse_args(argv)
    with np.load(args.data) as arrays:
        data = {k: arrays[k] for k in arrays.files}
    result = train(data, args.epochs, args.batch_size)
    args.json.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
