"""An 8B-parameter Llama-shaped LM (Llama 3 8B dimensions), for a TPU pod or a GPU cluster.

32 layers, width 4096, 32 query and 8 key/value heads of 128, SwiGLU 14336, vocabulary
128256 with an untied output; bfloat16 compute over float32 params, full remat per layer.

    tfds build c4/en --file_format=array_record --data_dir=gs://BUCKET/tfds   # once
    python -m scaling.main --experiment=lm_8b --mode=prepare \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer_model=tokenizer.json \
        --config.data.prepared_dir=/mnt/shared/lm_8b --config.data.prepare_workers=64
    python -m scaling.main --experiment=lm_8b --config.data.tfds_data_dir=gs://BUCKET/tfds \
        --config.data.tokenizer_model=tokenizer.json --config.data.prepared_dir=/mnt/shared/lm_8b
    python -m scaling.main --experiment=lm_8b --mode=describe --num_devices=64

Hardware: TPU v5p-128 (64 chips, 95 GiB each) with the documented mesh fsdp=16 x tensor=4
and a global batch of 512 sequences of 4096 tokens (2M tokens a step) in 4 microbatches;
or 8 nodes of 8 H100/H200 with the same mesh. Params and AdamW state: 89.8 GiB in all,
1.4 GiB a chip. `--mode=preflight --topology=v5p-128` compiles the step for that slice on a
CPU, with the splash attention kernel, the tiled loss and the residual stream split over
tensor: a peak of 7.2 GiB a chip of the 95 GiB with libtpu 0.0.52 (10.5 GiB as older libtpu
releases report it; XLA's "live at once" is 7.0 GiB under each); the same with einsum
attention in blocks of 1024 queries; with the whole batch in one pass
(--config.grad_accum_steps=1) 20.3 GiB (29.8 GiB with libtpu 0.0.42.1).
`lm_8b_32k` is the same model on sequences of 32,768 tokens (context parallelism).
Data: TFDS `c4/en` (365M web documents), tokenized once by --mode=prepare into sharded
ArrayRecord files on a filesystem every host mounts (NFS, GCSFuse),
documents packed into windows with attention kept within each.
Expected: the loss depends on the tokenizer and the steps you can afford; this file fixes the
shapes.
On a CPU it builds abstractly (shapes, shardings, a lowered step) without allocating.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    seq_len = 4096
    return ml_collections.ConfigDict({
        "task": "language_modeling",
        "data": {
            "name": "corpus",
            "sources": ("tfds:c4/en",),   # ArrayRecord under --config.data.tfds_data_dir
            "tokenizer": "huggingface",
            "tokenizer_model": "",        # Llama 3's tokenizer.json (128,256 ids)
            "seq_len": seq_len,
            "eval_max_windows": 4096,     # evaluate on the first 4096 validation windows
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
            "loss_chunk": 512,            # logits 512 positions at a time: 3 GiB less a chip
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
        "batch_size": 512,
        "grad_accum_steps": 4,        # the whole batch at once needs 29.8 GiB a chip
        "eval_batch_size": 512,
        "num_steps": 200_000,
        "log_every_steps": 10,
        "eval_every_steps": 5000,
        "mesh": {"data": 1, "fsdp": -1, "tensor": 4},
        "sharding_rules": (
            ("batch", ("data", "fsdp")),
            ("seq", "context"),
            ("embed", "fsdp"),
            ("residual", "tensor"),   # full remat keeps the stream of every layer: 1/4 a chip
            ("heads", "tensor"),
            ("kv", None),
            ("mlp", "tensor"),
            ("vocab", "tensor"),
            ("layers", None),
        ),
        "sample": {"temperature": 0.8, "top_k": 40},
    })
