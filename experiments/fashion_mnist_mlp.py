"""Fashion-MNIST MLP: the founding document's model on Zalando's clothing images.

Flatten, Dense 128 relu, Dense 128 relu, Dense 10; Adam at 1e-3 (Keras epsilon 1e-7);
batch 128; 10 epochs; pixels scaled to [0, 1]; softmax cross-entropy.

    python -m scaling.main --experiment=fashion_mnist_mlp

Hardware: any; written for a laptop CPU. Data: TFDS `fashion_mnist`, or offline the four
IDX files (Debian's `dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist,
which is found automatically).
Expected: test accuracy 0.87-0.90 after 10 epochs (0.8840 with jax 0.10.2, 0.8813 with jax
0.12.0.1), in about 10 seconds of training on a 2-core laptop CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "task": "classification",
        "data": {"name": "fashion_mnist"},
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
