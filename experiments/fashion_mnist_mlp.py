"""Fashion-MNIST MLP: the founding document's model on Zalando's clothing images.

Flatten, Dense 128 relu, Dense 128 relu, Dense 10; Adam at 1e-3 (Keras epsilon 1e-7);
batch 128; 10 epochs; pixels scaled to [0, 1]; softmax cross-entropy.

    python -m scaling.main --experiment=fashion_mnist_mlp

Hardware: any; written for a laptop CPU. Data: TFDS `fashion_mnist`, or offline the four
IDX files (Debian's `dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist,
which is found automatically).
Expected: test accuracy about 0.89 (at least 0.88) after 10 epochs, in about 10 seconds of
training on a 2-core laptop CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "seed": 0,
        "task": "classification",
        "data": {
            "name": "fashion_mnist",
            "manual_dir": "",       # a folder with the four IDX .gz files
            "tfds_data_dir": "",    # a TFDS data directory, e.g. gs://bucket/tensorflow_datasets
        },
        "model": {
            "name": "mlp",
            "hidden_sizes": (128, 128),
            "num_classes": 10,
            "dtype": "float32",
        },
        "optimizer": {
            "name": "adam",          # adam | adamw | sgd
            "learning_rate": 1e-3,
            "schedule": "constant",  # constant | warmup_cosine
            "warmup_steps": 0,
            "final_lr_fraction": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-7,
            "weight_decay": 0.0,     # adamw only
            "momentum": 0.9,         # sgd only; 0 disables it
            "nesterov": False,
            "clip_norm": 0.0,        # global-norm clipping; 0 disables it
        },
        "nan_policy": "abort",  # a non-finite loss or gradient: abort | skip the update
        "l2": 0.0,                   # λ in the loss term λ/2·Σw² over weight matrices
        "batch_size": 128,
        "grad_accum_steps": 1,       # microbatches per step; same update, less memory
        "eval_batch_size": 1000,
        "num_epochs": 10,
        "num_steps": -1,             # > 0 overrides num_epochs
        "steps_per_call": 64,        # training steps per compiled call
        # XLA options for this experiment's steps, per platform (scaling/compiler_options.py).
        # On a CPU, YNNPACK keeps the reductions but not the matmuls: XLA's own dot runs
        # these batch-128 products faster, and the step takes 1.14x less time.
        "xla_options": {"cpu": {"xla_cpu_experimental_ynn_fusion_type":
                                "LIBRARY_FUSION_TYPE_REDUCE"}},
        "log_every_steps": 100,
        "eval_every_steps": -1,      # -1: once per epoch
        "checkpoint_every_steps": 1000,  # -1: once per epoch; the last step is always saved
        "keep_checkpoints": 3,
        "mesh": {
            "data": -1, "fsdp": 1, "tensor": 1,  # -1: all remaining devices
            # Across TPU slices (multi-slice over DCN); each axis is ICI size x DCN size.
            "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1,
        },
        "sharding_rules": (
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("classes", None),
        ),
    })
