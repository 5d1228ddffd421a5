"""Hugging Face causal-LM directories in and out of a workdir, and as a run's starting point.

- `import_checkpoint` (`--mode=import_hf --source=DIR`): the directory's weights become an
  ordinary Orbax checkpoint (params only, step 0) in a new workdir, with its tokenizer, so
  eval, sample and export work on it at once and `init_from` can fine-tune from it.
- `export_checkpoint` (`--mode=export_hf`): a checkpoint's params as `config.json`, sharded
  safetensors and the run's tokenizer, which `transformers` and serving stacks load.

The files that say how the model is prompted and when it stops (the chat templates,
`tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`, and the source's
`config.json` as `hf_config.json`) travel with the tokenizer: the import keeps them in
`WORKDIR/tokenizer/`, where serving reads them, and the export writes them back, so an
exported model chats and stops as its source did.

An import reads straight into the target shardings (`scaling.inference.sources`), so it
never needs the whole model in one host's memory; an export gathers one layer of one param at
a time and streams it to disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from scaling.data.tokenizer import (
    SAVED_MODEL_FILES,
    TOKENIZER_DIR,
    HuggingFaceTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from scaling.errors import UserError
from scaling.inference import restore, sources
from scaling.interop import hf_config, hf_generation, hf_params, safetensors_io
from scaling.models import lora
from scaling.runtime import checkpoint
from scaling.runtime.workdir import write_config

TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face directory's tokenizer
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # its special tokens and chat template
# What the import keeps beside the saved tokenizer, and the export writes back, when present.
KEPT_FILES = (HF_TOKENIZER_CONFIG, "chat_template.jinja", "chat_template.json",
              "special_tokens_map.json", hf_generation.GENERATION_CONFIG)
KEPT_FOLDERS = ("additional_chat_templates",)  # named chat templates, one .jinja file each
DEFAULT_SHARD_BYTES = 4 << 30


def source_record(directory: Path) -> dict:
    """What provenance keeps of an imported directory: where, its config's digest, and each
    weight file's size (hashing a 70B model's files would take minutes)."""
    directory = Path(directory).resolve()
    config_bytes = (directory / hf_config.CONFIG_FILE).read_bytes()
    return {"path": str(directory),
            "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "files": {p.name: p.stat().st_size for p in sorted(directory.glob("*.safetensors"))}}


def _copy_whole(source: Path, target: Path) -> None:
    """A file or folder copied under a temporary name and renamed into place, so a reader
    finds the whole copy or none."""
    partial = target.with_name(f".{target.name}.partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    if source.is_dir():
        shutil.copytree(source, partial)
        if target.is_dir():
            shutil.rmtree(target)
    else:
        shutil.copyfile(source, partial)
    partial.replace(target)


def keep_model_files(directory: Path, tokenizer_dir: Path) -> list[str]:
    """Copies the source directory's chat and generation files beside the saved tokenizer;
    their names, as kept."""
    kept = []
    for name in (*KEPT_FILES, *KEPT_FOLDERS):
        source = directory / name
        if source.is_file() or (name in KEPT_FOLDERS and source.is_dir()):
            _copy_whole(source, tokenizer_dir / name)
            kept.append(name)
    _copy_whole(directory / hf_config.CONFIG_FILE,
                tokenizer_dir / hf_generation.KEPT_MODEL_CONFIG)
    return [*kept, hf_generation.KEPT_MODEL_CONFIG]


def import_checkpoint(config: ml_collections.ConfigDict, workdir: Path, source: str | None,
                      experiment=None) -> str:
    """`--mode=import_hf`: a Hugging Face directory into this (new) workdir's checkpoints."""
    if not source:
        raise UserError("--mode=import_hf needs --source=DIR, a Hugging Face model directory")
    sources.require_transformer(config, "--mode=import_hf")
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    if manager.all_steps():
        raise UserError(f"--workdir={workdir}: already holds checkpoints; import into a new "
                        "--workdir")
    directory = Path(source)
    spec = restore.model_spec(config, experiment)
    params, _ = sources.read_into(directory, config, spec.abstract_params)
    tokenizer_path = directory / TOKENIZER_FILE
    tokenizer = HuggingFaceTokenizer(str(tokenizer_path)) if tokenizer_path.is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens, more than "
                        f"--config.model.vocab_size={config.model.vocab_size}")
    try:
        checkpoint.save_params(manager, params)
    finally:
        manager.close()
    if jax.process_index() == 0:
        write_config(config, Path(workdir))
        if tokenizer is not None:
            save_tokenizer(tokenizer, Path(workdir) / TOKENIZER_DIR)
            keep_model_files(directory, Path(workdir) / TOKENIZER_DIR)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    return (f"imported {count:,} params from {directory} into {manager.directory / '0'}"
            + ("" if tokenizer else f" (no {TOKENIZER_FILE} there, so no tokenizer)"))


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    target: str | None = None          # default: WORKDIR/hf
    checkpoint_step: int | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


def _shards(entries: list, max_bytes: int) -> list[list]:
    """Consecutive groups of tensors, each under `max_bytes` unless one tensor exceeds it."""
    groups, size = [[]], 0
    for entry in entries:
        nbytes = int(np.prod(entry[3])) * entry[4].itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    return groups


def export_checkpoint(config: ml_collections.ConfigDict, workdir: Path,
                      options: ExportOptions, experiment=None) -> str:
    """`--mode=export_hf`: a checkpoint's params as a Hugging Face directory. It is staged
    beside the target and renamed into place when whole; an existing target is refused."""
    sources.require_transformer(config, "--mode=export_hf")
    target = Path(options.target) if options.target else Path(workdir) / "hf"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--artifact={target}: already exists; choose a new directory")
    restored = restore.load(config, workdir, options.checkpoint_step, experiment)
    m = config.model
    params = restored.params
    if m.lora_rank:  # the adapters folded into their kernels
        params = jax.jit(lambda p: lora.merged(p, m.lora_rank, m.lora_alpha))(params)
    entries = []
    for name, layout, path, layer in hf_params.hf_tensors(m):
        leaf = hf_params.leaf_at(params, path)
        shape = hf_params.hf_shape(layout, leaf.shape[1:] if layer is not None else leaf.shape)
        entries.append((name, layout, (path, layer), shape, np.dtype(leaf.dtype)))

    def produce(name: str) -> np.ndarray:
        _, layout, (path, layer), _, _ = by_name[name]
        leaf = hf_params.leaf_at(params, path)
        value = np.asarray(multihost_utils.process_allgather(
            leaf if layer is None else leaf[layer], tiled=True))
        return hf_params.to_hf(layout, value)

    by_name = {entry[0]: entry for entry in entries}
    groups = _shards(entries, options.max_shard_bytes)
    writer = jax.process_index() == 0
    staging = target.with_name(f".{target.name}.partial")
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file_name = (safetensors_io.SINGLE_FILE if len(groups) == 1
                     else f"model-{k:05d}-of-{len(groups):05d}.safetensors")
        tensors = [(e[0], e[3], e[4]) for e in group]
        if writer:
            safetensors_io.write(staging / file_name, tensors, produce, {"format": "pt"})
        else:  # the gathers are collective: every process takes part in each
            for name, _, _ in tensors:
                produce(name)
        weight_map.update({e[0]: file_name for e in group})
    if not writer:
        return ""
    tokenizer = load_tokenizer(Path(workdir) / TOKENIZER_DIR)
    has_hf_tokenizer = tokenizer is not None and isinstance(tokenizer, HuggingFaceTokenizer)
    dtypes = {np.dtype(e[4]).name for e in entries}
    hf = hf_config.to_hf(m, dtypes.pop() if len(dtypes) == 1 else "float32",
                         tokenizer.bos_id if has_hf_tokenizer else None,
                         tokenizer.eos_id if has_hf_tokenizer else None)
    kept = Path(workdir) / TOKENIZER_DIR
    if has_hf_tokenizer and (kept / hf_generation.KEPT_MODEL_CONFIG).is_file():
        source = hf_config.read_json_object(kept / hf_generation.KEPT_MODEL_CONFIG)
        hf.update({key: source[key] for key in ("bos_token_id", "eos_token_id")
                   if source.get(key) is not None})  # an instruct model's list of eos ids
    (staging / hf_config.CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    if len(groups) > 1:
        total = sum(int(np.prod(e[3])) * e[4].itemsize for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / safetensors_io.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if has_hf_tokenizer:
        shutil.copyfile(kept / SAVED_MODEL_FILES["huggingface"], staging / TOKENIZER_FILE)
        for name in KEPT_FILES:
            if (kept / name).is_file():
                shutil.copyfile(kept / name, staging / name)
        for name in KEPT_FOLDERS:
            if (kept / name).is_dir():
                shutil.copytree(kept / name, staging / name)
        if not (staging / hf_generation.GENERATION_CONFIG).is_file():
            generation = hf_generation.exported_generation_config(tokenizer.bos_id,
                                                                  tokenizer.eos_id)
            (staging / hf_generation.GENERATION_CONFIG).write_text(
                json.dumps(generation, indent=2) + "\n")
    if target.exists():
        target.rmdir()  # empty, checked above
    staging.replace(target)
    return (f"exported step {restored.step} of {workdir} to {target} ({len(groups)} "
            f"safetensors file{'s' if len(groups) > 1 else ''}"
            + (", tokenizer.json, generation_config.json" if has_hf_tokenizer
               else ", no Hugging Face tokenizer")
            + ")")
