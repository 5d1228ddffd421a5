"""`lm_8b` with sequences of 32,768 tokens, each split over 8 chips by context parallelism.

The same 8B model (32 layers, width 4096, 32 query and 8 key/value heads of 128, SwiGLU
14336, vocabulary 128256), the same 2M tokens a step (64 sequences in 4 microbatches), on a
TPU v5p-128 (64 chips) as data=1 x fsdp=2 x context=8 x tensor=4: every layer's activations
hold 4,096 positions of a sequence on each chip, attention gathers the keys and values of
the whole sequence (splash attention on the chip's queries, reordered so that each chip gets
an early and a late chunk of the causal triangle), and the params are split over fsdp and
context together, as MaxText does.

    python -m scaling.main --experiment=lm_8b_32k --mode=preflight --topology=v5p-128

compiles the step on a CPU to a peak of 7.7 GiB a chip of the 95 GiB with libtpu 0.0.52
(10.7 GiB as libtpu 0.0.42.1 reports it), an estimated 8.2-8.3 s a step and an MFU bound of 83-84%
(attention is half of the FLOPs at this length). Data and
commands are those of `lm_8b`; documents longer than 4,096 tokens are what this length is for.
RoPE keeps lm_8b's base of 500,000 (no scaling); raise it for longer contexts.
Expected: the loss depends on the tokenizer and the steps you can afford; this file fixes the
shapes.
On a CPU it builds abstractly (shapes, shardings, a lowered step) without allocating.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    seq_len = 32768
    return ml_collections.ConfigDict({
        "task": "language_modeling",
        "data": {
            "name": "corpus",
            "sources": ("tfds:c4/en",),   # ArrayRecord under --config.data.tfds_data_dir
            "tokenizer": "huggingface",
            "tokenizer_model": "",        # Llama 3's tokenizer.json (128,256 ids)
            "seq_len": seq_len,
            "eval_max_windows": 512,      # evaluate on the first 512 validation windows
        },
        "model": {
            "name": "transformer",
            "vocab_size": 128256,
            "num_layers": 32,
            "embed_dim": 4096,
            "num_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 128,
            "mlp_dim": 14336,
            "max_seq_len": seq_len,
            "rope_theta": 500_000.0,
            "tie_embeddings": False,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat_policy": "full",
            "query_chunk": 1024,          # einsum attention scores 1024 queries at a time
            "loss_chunk": 512,            # logits 512 positions at a time
        },
        "optimizer": {
            "name": "adamw",
            "learning_rate": 3e-4,
            "schedule": "warmup_cosine",
            "warmup_steps": 2000,
            "final_lr_fraction": 0.1,
            "b2": 0.95,
            "weight_decay": 0.1,
            "clip_norm": 1.0,
        },
        "batch_size": 64,
        "grad_accum_steps": 4,
        "eval_batch_size": 64,
        "num_steps": 200_000,
        "log_every_steps": 10,
        "eval_every_steps": 5000,
        "mesh": {"data": 1, "fsdp": -1, "context": 8, "tensor": 4},
        "sharding_rules": (
            ("batch", ("data", "fsdp")),
            ("seq", "context"),          # each sequence's activations split over 8 chips
            ("embed", ("fsdp", "context")),  # params split over those chips too
            ("residual", "tensor"),
            ("heads", "tensor"),
            ("kv", None),
            ("mlp", "tensor"),
            ("vocab", "tensor"),
            ("layers", None),
        ),
        "sample": {"temperature": 0.8, "top_k": 40},
    })
