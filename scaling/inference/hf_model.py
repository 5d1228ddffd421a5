"""A Hugging Face model directory, loaded for serving as it is: no import, no experiment.

What `--mode=export_hf` writes and what a Hub download holds: `config.json` (the
architecture, mapped by `scaling.interop.hf_config`), `*.safetensors` (read slice by slice
into the mesh's shardings, as an import reads them), `tokenizer.json`, and the chat template
and generation settings that `scaling.serving` reads from the same directory.

`literal_config` is the config such a directory stands for (what an experiment file's
`get_config()` would return for it); the caller resolves it against the schema, so the
defaults of every other field are the schema's, as for any experiment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from scaling.data.tokenizer import HuggingFaceTokenizer
from scaling.errors import UserError
from scaling.inference import restore, sources
from scaling.interop import hf_config

TOKENIZER_FILE = "tokenizer.json"
DTYPES = ("float32", "bfloat16")


def literal_config(directory: Path, dtype: str = "float32",
                   max_model_len: int | None = None) -> dict[str, Any]:
    """The config of a language-model experiment holding this directory's architecture.

    `max_model_len` (default: config.json's `max_position_embeddings`) bounds a prompt and
    its reply, and so the KV cache every decode slot may fill."""
    directory = Path(directory)
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
    hf = hf_config.read(directory)
    path = directory / hf_config.CONFIG_FILE
    fields = hf_config.model_fields(hf, path)
    if max_model_len is None:
        max_model_len = hf.get("max_position_embeddings")
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool):
            raise UserError(f"{path}: max_position_embeddings is missing or not an integer; "
                            "pass --max_model_len=N, the longest prompt and reply to serve")
    if max_model_len < 2:
        raise UserError(f"--max_model_len={max_model_len}: must be at least 2 (one prompt "
                        "token and one new token)")
    tokenizer = directory / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: missing; serving a Hugging Face directory needs its "
                        "tokenizer.json (save the tokenizer into the directory with "
                        "transformers' save_pretrained)")
    return {
        "task": "language_modeling",
        "data": {"name": "corpus", "tokenizer": "huggingface",
                 "tokenizer_model": str(tokenizer), "seq_len": max_model_len},
        "model": {"name": "transformer", **fields, "max_seq_len": max_model_len,
                  "dtype": dtype, "param_dtype": dtype},
    }


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The directory's model with its params on a mesh."""
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    params: Any


def load_tokenizer(config: ml_collections.ConfigDict) -> HuggingFaceTokenizer:
    """The directory's tokenizer.json, refused when it has more tokens than the model."""
    path = config.data.tokenizer_model
    tokenizer = HuggingFaceTokenizer(path)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"{path}: {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocab_size={config.model.vocab_size} in its {hf_config.CONFIG_FILE}")
    return tokenizer


def load(directory: Path, config: ml_collections.ConfigDict) -> Loaded:
    """The weights of `directory`, read into the shardings `config`'s mesh and rules give
    them; each process reads only the slices its devices hold."""
    spec = restore.model_spec(config)
    params, _ = sources.read_into(Path(directory), config, spec.abstract_params)
    return Loaded(mesh=spec.mesh, rules=spec.rules, model=spec.model, params=params)
