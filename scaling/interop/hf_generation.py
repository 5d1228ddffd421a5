"""A Hugging Face model's generation settings: the ids that end a reply, and the sampling
defaults its makers recommend, read the way vLLM reads them by default
(`--generation-config auto`).

vLLM takes a model's generation settings from its `generation_config.json`; where the
directory has none, from the same fields of its `config.json` (transformers'
`GenerationConfig.from_model_config`), never from both. Of those settings:

- every id of `eos_token_id` (one id or a list) ends a reply, beside the tokenizer's own
  end-of-text id, which always does. Llama 3 instruct checkpoints list `<|eot_id|>` there,
  the end of an assistant's turn; without it a chat reply runs on into the next turn.
  A request with `ignore_eos` ignores all of them alike.
- `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` and `max_new_tokens` (as
  `max_tokens`) become the defaults of the request fields a client leaves out: only the
  keys the file holds with a value other than null. `do_sample` is ignored, as vLLM ignores
  it: a file that sets `temperature` samples unless the request says otherwise.

`--mode=import_hf` keeps `generation_config.json`, and `config.json` as `hf_config.json`,
beside the workdir's saved tokenizer, so a served workdir reads the same settings as its
source directory. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Protocol

from scaling.errors import UserError
from scaling.interop.hf_config import read_json_object

GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
KEPT_MODEL_CONFIG = "hf_config.json"  # config.json as --mode=import_hf keeps it
# generation_config.json's key -> the request field it gives a default to.
SAMPLING_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature",
                 "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "max_new_tokens": "max_tokens"}


class HasEos(Protocol):
    eos_id: int


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    stop_ids: frozenset[int]  # the tokenizer's eos and every eos id of the settings file
    defaults: dict[str, Any]  # request field -> default, for the fields the file sets
    source: Path | None = None  # the file they were read from; None: the tokenizer alone


def settings_file(directory: Path) -> Path | None:
    """The file vLLM would read: generation_config.json, else the model's config."""
    for name in (GENERATION_CONFIG, MODEL_CONFIG, KEPT_MODEL_CONFIG):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def eos_ids(settings: dict, path: Path) -> list[int]:
    """The ids of `eos_token_id`: absent or null, one id, or a list of ids."""
    value = settings.get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{path}: eos_token_id={json.dumps(value)} must be a token id or a "
                        "list of token ids")
    return values


def _check(key: str, value: Any, path: Path) -> Any:
    integer = key in ("top_k", "max_new_tokens")
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (not integer or float(value).is_integer()))
    if ok:
        value = int(value) if integer else float(value)
        ok = {"temperature": value >= 0, "top_p": 0 < value <= 1, "top_k": value >= -1,
              "min_p": 0 <= value <= 1, "repetition_penalty": value > 0,
              "max_new_tokens": value >= 1}[key]
    if not ok:
        wanted = {"temperature": "a number of at least 0", "top_p": "a number in (0, 1]",
                  "top_k": "an integer of at least -1", "min_p": "a number in [0, 1]",
                  "repetition_penalty": "a number above 0",
                  "max_new_tokens": "an integer of at least 1"}[key]
        raise UserError(f"{path}: {key}={json.dumps(value)} must be {wanted}; fix the file")
    return value


def read_generation_settings(directory: Path, tokenizer: HasEos) -> GenerationSettings:
    """The stop ids and request defaults of a Hugging Face directory, or of a workdir's
    tokenizer folder where the import kept its files. A directory without any of those files
    stops on the tokenizer's end-of-text id alone and sets no defaults."""
    path = settings_file(directory)
    stop = {int(tokenizer.eos_id)}
    if path is None:
        return GenerationSettings(frozenset(stop), {})
    settings = read_json_object(path)
    stop.update(eos_ids(settings, path))
    defaults = {field: _check(key, settings[key], path) for key, field in SAMPLING_KEYS.items()
                if settings.get(key) is not None}
    return GenerationSettings(frozenset(stop), defaults, path)


def exported_generation_config(bos_id: int | None, eos_id: int) -> dict:
    """The generation_config.json of an export whose source kept none: its special ids, as
    transformers writes them for a model config without generation fields."""
    config = {"eos_token_id": eos_id}
    if bos_id is not None:
        config = {"bos_token_id": bos_id, **config}
    return config
