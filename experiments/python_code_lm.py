"""A small code model on a real local corpus: the Python sources a Debian machine ships.

Every `*.py` file under /usr/lib/python3* (the standard library and Debian's Python packages:
here 2,013 files, 28 MB) is one document; 2% of them, chosen by a hash of their text, are
held out for validation. Bytes are the tokens (plus an end-of-document id), windows of 256
bytes are packed with document boundaries (attention never crosses files, and rotary
positions restart in each), and a 4-layer, 128-wide decoder (0.82M parameters) trains for
1,000 steps of 32 windows (8.2M bytes, about 0.3 epochs).

    python -m scaling.main --experiment=python_code_lm --mode=prepare
    python -m scaling.main --experiment=python_code_lm
    python -m scaling.main --experiment=python_code_lm --mode=sample --prompt="def main("

Hardware: a laptop CPU (also runs unchanged on GPU or TPU). Data: any Debian or Ubuntu
machine has these files; point `--config.data.sources=text:GLOB` at other code to train on it.
Expected: prepare in about 1 s with 2 workers; validation loss below 1.45 nats per byte
(measured: 1.416, perplexity 4.12; training loss 1.15) after 1,000 steps, in about 10.5
minutes on a 2-core CPU (14,500 tokens/s).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    seq_len = 256
    return ml_collections.ConfigDict({
        "task": "language_modeling",
        "data": {
            "name": "corpus",
            "sources": ("text:/usr/lib/python3*/**/*.py",),
            "tokenizer": "byte",
            "seq_len": seq_len,
            "packing": "documents",
            "validation_fraction": 0.02,
            "eval_max_windows": 2048,   # 0.5M bytes of validation text at each evaluation
        },
        "model": {
            "name": "transformer",
            "vocab_size": 264,          # 256 bytes and the end-of-document id, padded to 8
            "num_layers": 4,
            "embed_dim": 128,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "mlp_dim": 384,
            "max_seq_len": seq_len,
            "tie_embeddings": True,
            "scan_unroll": 4,
            "attention": "batched_matmul",
        },
        "optimizer": {
            "name": "adamw",
            "learning_rate": 2e-3,
            "schedule": "warmup_cosine",
            "warmup_steps": 100,
            "final_lr_fraction": 0.1,
            "b2": 0.99,
            "weight_decay": 0.1,
            "clip_norm": 1.0,
        },
        "batch_size": 32,
        "eval_batch_size": 64,
        "num_steps": 1000,
        "steps_per_call": 10,
        "log_every_steps": 50,
        "eval_every_steps": 500,
        "checkpoint_every_steps": 500,
        "keep_checkpoints": 2,
        "sample": {"max_new_tokens": 400, "temperature": 0.7, "top_k": 40},
    })
