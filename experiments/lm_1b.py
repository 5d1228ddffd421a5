"""A 1.2B-parameter Llama-shaped LM (Llama 3.2 1B dimensions), for a TPU slice or a GPU node.

16 layers, width 2048, 32 query and 8 key/value heads of 64, SwiGLU 8192, vocabulary
128256 with tied embeddings; bfloat16 compute over float32 params, saving matmul outputs.

    tfds build lm1b --file_format=array_record --data_dir=gs://BUCKET/tfds   # once
    python -m scaling.main --experiment=lm_1b --mode=prepare \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer_model=tokenizer.json \
        --config.data.prepared_dir=/mnt/shared/lm_1b --config.data.prepare_workers=64
    python -m scaling.main --experiment=lm_1b --config.data.tfds_data_dir=gs://BUCKET/tfds \
        --config.data.tokenizer_model=tokenizer.json --config.data.prepared_dir=/mnt/shared/lm_1b
    python -m scaling.main --experiment=lm_1b --mode=describe --num_devices=16

Hardware: TPU v5p-32 (16 chips), or 8-16 H100/H200, with the documented mesh fsdp=16 and a
global batch of 256 sequences of 2048 tokens (0.5M tokens a step). Params and AdamW state:
13.8 GiB in all, 0.9 GiB a chip on 16 chips. `--mode=preflight --topology=v5p-32` on a CPU
compiles the step (splash attention, tiled loss) to a peak of 40.8 GiB a chip of the 95 GiB
(71.4 GiB with whole logits). A v5e-16 (16 GiB a chip) needs `--config.grad_accum_steps=8`:
7.1 GiB (the whole batch at once needs 40.8 GiB).
Data: TFDS `lm1b` (the One Billion Word benchmark, 30M sentences, each a document), tokenized
once by --mode=prepare into sharded ArrayRecord files on a filesystem every host mounts,
documents packed into windows with attention kept within each.
Expected: the loss depends on the tokenizer and the steps you can afford; this file fixes the
shapes.
On a CPU it builds abstractly (shapes, shardings, a lowered step) without allocating.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    seq_len = 2048
    return ml_collections.ConfigDict({
        "task": "language_modeling",
        "data": {
            "name": "corpus",
            "sources": ("tfds:lm1b",),    # ArrayRecord under --config.data.tfds_data_dir
            "tokenizer": "huggingface",
            "tokenizer_model": "",        # Llama 3's tokenizer.json (128,256 ids)
            "seq_len": seq_len,
            "eval_max_windows": 4096,     # evaluate on the first 4096 validation windows
        },
        "model": {
            "name": "transformer",
            "vocab_size": 128256,
            "num_layers": 16,
            "embed_dim": 2048,
            "num_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 64,
            "mlp_dim": 8192,
            "max_seq_len": seq_len,
            "rope_theta": 500_000.0,
            "tie_embeddings": True,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat_policy": "dots_with_no_batch_dims",
            "loss_chunk": 512,            # logits 512 positions at a time: 30 GiB less a chip
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
        "batch_size": 256,
        "eval_batch_size": 256,
        "num_steps": 100_000,
        "log_every_steps": 10,
        "eval_every_steps": 5000,
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "sample": {"temperature": 0.8, "top_k": 40},
    })
