"""MNIST MLP: the founding document's hello world, handwritten digits.

Flatten, Dense 128 relu, Dense 128 relu, Dense 10; Adam at 1e-3 (Keras epsilon 1e-7);
batch 128; 10 epochs; pixels scaled to [0, 1]; softmax cross-entropy.

    python -m scaling.main --experiment=mnist_mlp

Hardware: any; written for a laptop CPU. Data: TFDS `mnist`, which needs the network and
TensorFlow (pip install 'scaling[tfds]') the first time; offline, set
--config.data.manual_dir to a folder holding the four IDX .gz files. Without any of these
the run stops at once with a message listing the options.
Expected: test accuracy about 0.978 (at least 0.975) after 10 epochs, in about 10 seconds
of training on a 2-core laptop CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "task": "classification",
        "data": {"name": "mnist"},
        "model": {"name": "mlp", "hidden_sizes": (128, 128), "num_classes": 10},
        "optimizer": {"name": "adam", "learning_rate": 1e-3, "eps": 1e-7},  # Keras's epsilon
        "batch_size": 128,
        "num_epochs": 10,
        "steps_per_call": 64,        # training steps per compiled call
        # On a CPU, YNNPACK keeps the reductions but not the matmuls: XLA's own dot runs
        # these batch-128 products faster, and the step takes 1.14x less time.
        "xla_options": {"cpu": {"xla_cpu_experimental_ynn_fusion_type":
                                "LIBRARY_FUSION_TYPE_REDUCE"}},
    })
