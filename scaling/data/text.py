"""A prepared text corpus as a dataset: training windows by mixture order, streamed eval.

The corpus must have been prepared (`--mode=prepare`, see `scaling.data.prepare`) with the
tokenizer saved beside it; training refuses one that is missing, incomplete or made with
another tokenizer, with the command that prepares it. Nothing here holds more than the
manifests in memory: windows are read by random access when a step needs them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from scaling.data import prepare as prepare_lib
from scaling.data.packed_windows import TokenStream, WindowOrder, Windows
from scaling.data.text_sources import SourceSpec
from scaling.data.tokenizer import (
    TOKENIZER_DIR,
    Tokenizer,
    fingerprint,
    load_tokenizer,
    matches_config,
)
from scaling.errors import UserError


@dataclasses.dataclass
class TextCorpus:
    """The dataset of a language model: what the loop, the loader and inference ask of it."""
    name: str
    source: str
    tokenizer: Tokenizer
    train_sources: list[Windows]
    order: WindowOrder
    eval_splits: dict[str, Windows]
    eval_limit: int                      # windows evaluated per split; 0: all
    label_names: tuple[str, ...] = ()
    streamed = True                      # rows come from disk: the loader reads ahead

    @property
    def num_train(self) -> int:
        return sum(w.num_windows for w in self.train_sources)

    def train_rows(self, seed: int, step: int, batch_size: int,
                   rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows` of the global batch at `step`; `seed` is the order's, fixed at load."""
        del seed  # part of `order`
        sources, windows = self.order.locate(step * batch_size + np.asarray(rows, np.int64))
        out: dict[str, np.ndarray] = {}
        for source in np.unique(sources):
            where = np.flatnonzero(sources == source)
            batch = self.train_sources[source].read(windows[where])
            for key, value in batch.items():
                if key not in out:
                    out[key] = np.empty((len(rows),) + value.shape[1:], value.dtype)
                out[key][where] = value
        return out

    def eval_size(self, split: str) -> int:
        count = self.eval_splits[split].num_windows
        return min(count, self.eval_limit) if self.eval_limit > 0 else count

    def eval_rows(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.eval_splits[split].read(indices)


def prepare_command(config) -> str:
    return (f"python -m scaling.main --experiment={config.experiment or 'EXPERIMENT'} "
            "--mode=prepare" + (f" --config.data.prepared_dir={config.data.prepared_dir}"
                                if config.data.prepared_dir else ""))


def _open_source(root: Path, spec: SourceSpec, config, tokenizer_print: str) -> dict:
    path = root / spec.slug / prepare_lib.MANIFEST
    if not path.is_file():
        raise UserError(f"corpus source {spec.text!r} is not prepared in {root / spec.slug}; "
                        f"prepare it first: {prepare_command(config)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the manifest ({e}); delete {root / spec.slug} "
                        f"and prepare again: {prepare_command(config)}") from None
    if manifest.get("format") != prepare_lib.FORMAT:
        raise UserError(f"{path}: written by another version of the prepare step; delete "
                        f"{root / spec.slug} and prepare again: {prepare_command(config)}")
    if manifest["tokenizer"]["fingerprint"] != tokenizer_print:
        raise UserError(f"{path}: prepared with another tokenizer "
                        f"({manifest['tokenizer']['kind']}, {manifest['tokenizer']['fingerprint']}"
                        f", not {tokenizer_print}); prepare it with this one into a new "
                        f"--config.data.prepared_dir: {prepare_command(config)}")
    return manifest


def corpus_tokenizer(config, root: Path) -> Tokenizer:
    """The tokenizer saved with the corpus, checked against the one the config asks for."""
    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    if tokenizer is None:
        raise UserError(f"the corpus is not prepared in {root} (no tokenizer there); prepare "
                        f"it first: {prepare_command(config)}")
    data = config.data
    if not matches_config(tokenizer, data):
        kind = tokenizer.saved_form()[0]["kind"]
        raise UserError(f"--config.data.tokenizer={data.tokenizer}"
                        + (f" --config.data.tokenizer_model={data.tokenizer_model}"
                           if data.tokenizer_model else "")
                        + f": the corpus in {root} was prepared with another tokenizer "
                        f"({kind}); prepare it into a new --config.data.prepared_dir: "
                        f"{prepare_command(config)}")
    return tokenizer


def load_text_corpus(config) -> TextCorpus:
    """Open the prepared corpus of `config.data`, preparing it first where the experiment
    allows (`data.prepare_if_missing`, for small corpora such as tiny Shakespeare)."""
    data = config.data
    root = prepare_lib.corpus_root(config)
    specs = prepare_lib.source_specs(data)
    complete = (root / TOKENIZER_DIR).is_dir() and all(
        (root / s.slug / prepare_lib.MANIFEST).is_file() for s in specs)
    if not complete and data.prepare_if_missing:
        import jax

        if jax.process_count() > 1:
            raise UserError(f"the corpus is not prepared in {root}; with several processes, "
                            f"prepare it once first: {prepare_command(config)}")
        prepare_lib.prepare(config)
    tokenizer = corpus_tokenizer(config, root)
    tokenizer_print = fingerprint(tokenizer)
    train, evals, sizes = [], {}, []
    for spec in specs:
        manifest = _open_source(root, spec, config, tokenizer_print)
        directory = root / spec.slug
        windows = Windows(TokenStream(directory, manifest, "train"), data.seq_len,
                          data.packing, evaluation=False)
        if windows.num_windows < 1:
            raise UserError(f"--config.data.seq_len={data.seq_len}: longer than the training "
                            f"text of {spec.text!r} ({windows.stream.num_tokens} tokens)")
        train.append(windows)
        sizes.append(windows.num_windows)
        for split in data.eval_splits:
            if split not in manifest["splits"]:
                raise UserError(f"--config.data.eval_splits: {spec.text!r} has no {split!r} "
                                f"split; it has {', '.join(manifest['splits'])}")
            name = split if len(specs) == 1 else f"{split}/{spec.text.split('@')[0]}"
            evals[name] = Windows(TokenStream(directory, manifest, split),
                                  data.seq_len, data.packing, evaluation=True)
    order = WindowOrder(sizes, [s.weight for s in specs], config.seed)
    source = ", ".join(f"{s.text}" for s in specs) + f" prepared in {root}"
    return TextCorpus(name=data.name, source=source, tokenizer=tokenizer, train_sources=train,
                      order=order, eval_splits=evals, eval_limit=data.eval_max_windows)
