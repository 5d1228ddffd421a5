"""Tokenizers that work offline: characters or bytes by default, SentencePiece when given.

A character vocabulary is the sorted set of characters in the whole corpus, so training,
evaluation and sampling rebuild exactly the same ids from the same text.
"""

from __future__ import annotations

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
