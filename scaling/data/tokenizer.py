"""Tokenizers that work offline: characters or bytes by default, SentencePiece when given.

A character vocabulary is the sorted set of characters in the whole corpus, so training and
evaluation rebuild exactly the same ids from the same text. Training also saves the tokenizer
in its workdir (`save_tokenizer`), so sampling needs the checkpoint and that copy, never the
corpus: a run can be sampled after its training text is gone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from scaling.errors import UserError

TOKENIZERS = ("char", "byte", "sentencepiece")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class CharTokenizer:
    def __init__(self, corpus: str):
        self.chars = "".join(sorted(set(corpus)))
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise UserError(f"characters {''.join(unknown)!r} are not in the character "
                            "vocabulary of the training text")
        return np.fromiter((self._ids[c] for c in text), np.int32, len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        self.model_file = str(model_file)
        try:
            import sentencepiece
        except ImportError:
            raise UserError("--config.data.tokenizer=sentencepiece needs the sentencepiece "
                            "package: pip install sentencepiece") from None
        if not Path(model_file).is_file():
            raise UserError(f"--config.data.tokenizer_model={model_file}: no such file")
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = int(self._processor.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in ids])


def make_tokenizer(name: str, corpus: str, model_file: str = "") -> Tokenizer:
    if name == "char":
        return CharTokenizer(corpus)
    if name == "byte":
        return ByteTokenizer()
    if name == "sentencepiece":
        return SentencePieceTokenizer(model_file)
    raise UserError(f"--config.data.tokenizer={name}: expected one of {', '.join(TOKENIZERS)}")


TOKENIZER_DIR = "tokenizer"  # in the workdir
# The saved copy: one JSON file naming the kind; a SentencePiece model file beside it.
SAVED_FILE = "tokenizer.json"
SAVED_MODEL_FILE = "tokenizer.model"


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Write `tokenizer` into `directory` so `load_tokenizer` rebuilds it without the corpus.

    The JSON file is written last and renamed into place, so a reader finds either the
    previous copy or the whole new one, never a description whose model file is missing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CharTokenizer):
        saved = {"kind": "char", "chars": tokenizer.chars}
    elif isinstance(tokenizer, ByteTokenizer):
        saved = {"kind": "byte"}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        partial_model = directory / f".{SAVED_MODEL_FILE}.tmp-{os.getpid()}"
        shutil.copyfile(tokenizer.model_file, partial_model)
        partial_model.replace(directory / SAVED_MODEL_FILE)
        saved = {"kind": "sentencepiece", "model_file": SAVED_MODEL_FILE}
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    saved["vocab_size"] = int(tokenizer.vocab_size)
    partial = directory / f".{SAVED_FILE}.tmp-{os.getpid()}"
    partial.write_text(json.dumps(saved, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    partial.replace(directory / SAVED_FILE)


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The tokenizer saved in `directory`, or None when nothing was saved there."""
    path = Path(directory) / SAVED_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        kind = saved["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read the saved tokenizer ({e}); delete it to rebuild "
                        "the tokenizer from the corpus") from None
    if kind == "char":
        tokenizer = CharTokenizer(saved["chars"])
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer(str(Path(directory) / saved["model_file"]))
    else:
        raise UserError(f"{path}: unknown tokenizer kind {kind!r}; expected one of "
                        f"{', '.join(TOKENIZERS)}")
    if tokenizer.vocab_size != saved.get("vocab_size", tokenizer.vocab_size):
        raise UserError(f"{path}: records {saved['vocab_size']} tokens but rebuilds "
                        f"{tokenizer.vocab_size}; the saved copy is damaged")
    return tokenizer
