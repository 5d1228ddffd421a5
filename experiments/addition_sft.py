"""Supervised fine-tuning on a generated task: a small transformer learns to add numbers.

Prompt/response pairs `123+456=` -> `579` (both numbers below 1000), generated from the seed,
packed whole into 64-token windows; the loss counts only the response tokens and the end of
text. Evaluation reports exact match: held-out pairs (5%, by a hash of the prompt, so none
was seen in training) whose whole answer greedy decoding gets right.

    python -m scaling.main --experiment=addition_sft
    python -m scaling.main --experiment=addition_sft --mode=sample --prompt=123+456= \
        --temperature=0

Fine-tuning a pretrained model instead: point --config.data.sft_source at JSON Lines of
prompt/response pairs (jsonl:PATH/*.jsonl), set the model fields to its architecture and
pass --config.init_from=DIR (a Hugging Face directory or a workdir).

Hardware: a laptop CPU. Expected: validation exact match above 0.90 after 2000 steps (0.931
measured, with a response-token accuracy of 0.979), in 4 to 5 minutes on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    seq_len = 64
    return ml_collections.ConfigDict({
        "task": "sft",
        "data": {
            "name": "sft",
            "sft_source": "synthetic:add",
            "synthetic_examples": 20000,
            "tokenizer": "char",
            "seq_len": seq_len,
        },
        "model": {
            "name": "transformer",
            "vocab_size": 16,        # 10 digits, + and =, the end of text; a multiple of 8
            "num_layers": 4,
            "embed_dim": 128,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "mlp_dim": 384,
            "max_seq_len": seq_len,
            "scan_unroll": 4,
            "attention": "batched_matmul",
        },
        "optimizer": {
            "name": "adamw",
            "learning_rate": 1e-3,
            "schedule": "warmup_cosine",
            "warmup_steps": 100,
            "final_lr_fraction": 0.1,
            "weight_decay": 0.1,
            "clip_norm": 1.0,
        },
        "batch_size": 32,
        "eval_batch_size": 64,
        "num_steps": 2000,
        "steps_per_call": 10,
        "log_every_steps": 100,
        "eval_every_steps": 500,
        "checkpoint_every_steps": 500,
        "keep_checkpoints": 2,
        "sample": {"max_new_tokens": 8, "temperature": 0.0},
    })
