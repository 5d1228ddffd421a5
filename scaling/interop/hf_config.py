"""A Hugging Face `config.json` as our transformer's model fields, and back.

Our transformer is Llama-shaped, so an import maps the architecture fields one to one and
refuses, naming the field, whatever would change the computation in a way the model cannot
follow (another activation, sliding windows, rotary scalings other than Llama 3's, biases
where Llama has none). The experiment states the architecture literally, as every experiment
does; `check_matches` holds it against the checkpoint's and lists each difference as the
override that fixes it. Nothing here imports JAX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scaling.errors import UserError

CONFIG_FILE = "config.json"
# model_type -> the class name written on export, and whether q/k/v carry biases.
FAMILIES = {"llama": ("LlamaForCausalLM", False), "mistral": ("MistralForCausalLM", False),
            "qwen2": ("Qwen2ForCausalLM", True)}
LLAMA3_KEYS = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
               "rope_high_freq_factor": "high_freq_factor",
               "rope_original_max_len": "original_max_position_embeddings"}
# Our model fields an import sets, and so the ones an experiment must agree on.
ARCHITECTURE = ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                "head_dim", "mlp_dim", "rope_theta", "rope_scaling", *LLAMA3_KEYS,
                "norm_eps", "tie_embeddings", "qkv_bias")


def read(directory: Path) -> dict:
    """`config.json` of a model directory, which must exist and hold a JSON object."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: not a directory; pass a Hugging Face model directory "
                        f"(its {CONFIG_FILE} and *.safetensors)")
    if not path.is_file():
        raise UserError(f"{path}: missing; a Hugging Face model directory holds "
                        f"{CONFIG_FILE} beside its *.safetensors")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, as every file of a model directory does."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); fix or delete the file") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def model_fields(hf: dict, path: Path) -> dict[str, Any]:
    """Our `model.*` values for the architecture `hf` describes; refuses what we cannot run."""
    def get(key, default=None, required=False):
        if required and hf.get(key) is None:
            raise UserError(f"{path}: {key} is missing")
        value = hf.get(key, default)
        return default if value is None else value

    def refuse(key, value, why):
        raise UserError(f"{path}: {key}={json.dumps(value)} is not supported ({why})")

    family = hf.get("model_type")
    if family not in FAMILIES:
        refuse("model_type", family, f"supported: {', '.join(FAMILIES)}")
    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU, silu only")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            refuse(key, hf[key], "Llama-family projections have no biases")
    if family == "qwen2" and get("use_sliding_window", False):
        refuse("use_sliding_window", True, "attention is over the whole context")
    if family == "mistral" and get("sliding_window") is not None:
        refuse("sliding_window", hf["sliding_window"], "attention is over the whole context")
    heads = int(get("num_attention_heads", required=True))
    embed = int(get("hidden_size", required=True))
    fields = {
        "vocab_size": int(get("vocab_size", required=True)),
        "num_layers": int(get("num_hidden_layers", required=True)),
        "embed_dim": embed,
        "num_heads": heads,
        "num_kv_heads": int(get("num_key_value_heads", heads)),
        "head_dim": int(get("head_dim", embed // heads)),
        "mlp_dim": int(get("intermediate_size", required=True)),
        "norm_eps": float(get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "qkv_bias": FAMILIES[family][1],
    }
    fields.update(_rope_fields(hf, path, refuse))
    return fields


def _rope_fields(hf: dict, path: Path, refuse) -> dict[str, Any]:
    # Hub checkpoints write `rope_theta` and `rope_scaling`; transformers 5 writes both into
    # `rope_parameters`.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        refuse("rope_scaling", rope, "expected an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta") or 10_000.0))}
    if kind == "default":
        return {**fields, "rope_scaling": "none"}
    if kind != "llama3":
        refuse("rope_type", kind, "supported: default, llama3")
    missing = [key for key in LLAMA3_KEYS.values() if key not in rope]
    if missing:
        raise UserError(f"{path}: llama3 rope scaling without {', '.join(missing)}")
    fields["rope_scaling"] = "llama3"
    for ours, theirs in LLAMA3_KEYS.items():
        fields[ours] = (int if ours == "rope_original_max_len" else float)(rope[theirs])
    return fields


def check_matches(model_config, fields: dict[str, Any], path: Path) -> None:
    """Refuse an experiment whose model differs from the checkpoint's, listing every field as
    the override that fixes it. A larger vocabulary is allowed: its extra rows start at zero
    (tensor parallelism may need the padding)."""
    wrong = []
    for key, value in fields.items():
        if key in LLAMA3_KEYS and fields["rope_scaling"] != "llama3":
            continue
        ours = model_config.get(key)
        if key == "vocab_size" and ours is not None and ours >= value:
            continue
        if ours != value:
            wrong.append(f"--config.model.{key}={value} (the experiment has {ours})")
    if len(wrong) == 1:
        raise UserError(f"{path}: the checkpoint needs {wrong[0]}; set it in the experiment "
                        "file")
    if wrong:
        raise UserError(f"{path}: the checkpoint's architecture differs from the experiment's "
                        f"in {len(wrong)} fields; set them in the experiment file:\n  "
                        + "\n  ".join(wrong))


def to_hf(model_config, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """The `config.json` of an export: Qwen2 when the projections carry biases, else Llama."""
    m = model_config
    family = "qwen2" if m.qkv_bias else "llama"
    config = {
        "architectures": [FAMILIES[family][0]], "model_type": family,
        "vocab_size": m.vocab_size, "hidden_size": m.embed_dim,
        "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "torch_dtype": dtype,
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    if family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config["use_sliding_window"] = False
    if m.rope_scaling == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", **{
            theirs: m[ours] for ours, theirs in LLAMA3_KEYS.items()}}
    return config
