"""Tokenizers that work offline: characters, bytes, SentencePiece and Hugging Face files.

Every tokenizer has an end-of-document id (`eos_id`), and a begin-of-document id (`bos_id`)
where its vocabulary defines one: packing puts them around each document so the model sees
where one ends and the next begins. Characters and bytes get an id past their own for it;
SentencePiece and Hugging Face vocabularies use their own special pieces when they have them.

A character vocabulary is the sorted set of characters in the whole corpus. Training saves
the tokenizer in its workdir (`save_tokenizer`) and a prepared corpus in its own folder, so
sampling needs the checkpoint and that copy, never the corpus. `fingerprint` names a
tokenizer by its contents, so a corpus prepared with one is never read with another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from scaling.errors import UserError

TOKENIZERS = ("char", "byte", "sentencepiece", "huggingface")
# Special pieces looked up in a Hugging Face vocabulary, most specific first.
HF_EOS_PIECES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
HF_BOS_PIECES = ("<|begin_of_text|>", "<s>", "<bos>")


class Tokenizer(Protocol):
    vocab_size: int      # ids are below this, special ones included
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids, skip_special_tokens: bool = True) -> str: ...

    def encode_prompt(self, text: str) -> np.ndarray: ...

    def special_ids(self) -> frozenset[int]: ...

    def saved_form(self) -> tuple[dict, Path | None]: ...


def _without_specials(tokenizer: Tokenizer, ids) -> list[int]:
    specials = {tokenizer.eos_id, tokenizer.bos_id}
    return [int(i) for i in ids if int(i) not in specials]


class _NoSpecialPieces:
    """For vocabularies whose only special ids are the boundaries added past the text's own:
    a prompt is encoded as a document is, and those ids never have text."""

    def encode_prompt(self, text: str) -> np.ndarray:
        return self.encode(text)

    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.eos_id, self.bos_id) if i is not None)


class CharTokenizer(_NoSpecialPieces):
    def __init__(self, corpus: str):
        self.chars = "".join(sorted(set(corpus)))
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self.bos_id = None
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise UserError(f"characters {''.join(unknown)!r} are not in the character "
                            "vocabulary of the training text")
        return np.fromiter((self._ids[c] for c in text), np.int32, len(text))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i] for i in _without_specials(self, ids))

    def saved_form(self) -> tuple[dict, Path | None]:
        return {"kind": "char", "chars": self.chars}, None


class ByteTokenizer(_NoSpecialPieces):
    vocab_size = 257
    eos_id = 256
    bos_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(_without_specials(self, ids)).decode("utf-8", errors="replace")

    def saved_form(self) -> tuple[dict, Path | None]:
        return {"kind": "byte"}, None


def _model_file(model_file: str, kind: str) -> Path:
    if not model_file:
        raise UserError(f"--config.data.tokenizer={kind} needs --config.data.tokenizer_model, "
                        "the tokenizer's file (or run --mode=prepare, which can train a "
                        "SentencePiece model on the corpus)")
    path = Path(model_file).expanduser()
    if not path.is_file():
        raise UserError(f"--config.data.tokenizer_model={model_file}: no such file")
    return path


class SentencePieceTokenizer(_NoSpecialPieces):
    def __init__(self, model_file: str):
        import sentencepiece

        self.model_file = _model_file(model_file, "sentencepiece")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(
                model_file=str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"--config.data.tokenizer_model={model_file}: not a SentencePiece "
                            f"model ({e})") from None
        pieces = int(self._processor.get_piece_size())
        eos, bos = int(self._processor.eos_id()), int(self._processor.bos_id())
        self.eos_id = eos if eos >= 0 else pieces
        self.bos_id = bos if bos >= 0 else None
        self.vocab_size = pieces + (eos < 0)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._processor.decode(_without_specials(self, ids))

    def saved_form(self) -> tuple[dict, Path | None]:
        return {"kind": "sentencepiece"}, self.model_file


class HuggingFaceTokenizer:
    """A `tokenizer.json` of the Hugging Face `tokenizers` library (Llama 3 style BPE).

    Special pieces written literally in a document are encoded as ordinary text, so a
    document can never end itself early by containing the string of the end-of-text piece.
    """

    def __init__(self, model_file: str):
        import tokenizers

        self.model_file = _model_file(model_file, "huggingface")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.model_file))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise UserError(f"--config.data.tokenizer_model={model_file}: not a Hugging Face "
                            f"tokenizer.json ({e})") from None
        self._tokenizer.encode_special_tokens = True
        size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self._size = size
        eos = self._first_piece(HF_EOS_PIECES)
        self.eos_id = size if eos is None else eos
        self.bos_id = self._first_piece(HF_BOS_PIECES)
        self.vocab_size = max(size + (eos is None), self.eos_id + 1)

    def _first_piece(self, pieces: tuple[str, ...]) -> int | None:
        for piece in pieces:
            found = self._tokenizer.token_to_id(piece)
            if found is not None:
                return int(found)
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_prompt(self, text: str) -> np.ndarray:
        """Ids of a prompt sent to the server (a chat template's output, or a completions
        prompt the client rendered), whose special pieces (`<|eot_id|>`, ...) are meant as
        those tokens, unlike the special pieces a document happens to contain."""
        self._tokenizer.encode_special_tokens = False
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = True
        return np.asarray(ids, np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special pieces (`<|eot_id|>`, ...) are left out unless
        `skip_special_tokens` is False, as `transformers` decodes."""
        ids = [int(i) for i in ids if int(i) < self._size]  # past the file: an added eos
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_ids(self) -> frozenset[int]:
        added = self._tokenizer.get_added_tokens_decoder()
        return frozenset(int(i) for i, token in added.items() if token.special)

    def saved_form(self) -> tuple[dict, Path | None]:
        return {"kind": "huggingface"}, self.model_file


def make_tokenizer(name: str, corpus: str, model_file: str = "") -> Tokenizer:
    if name == "char":
        return CharTokenizer(corpus)
    if name == "byte":
        return ByteTokenizer()
    if name == "sentencepiece":
        return SentencePieceTokenizer(model_file)
    if name == "huggingface":
        return HuggingFaceTokenizer(model_file)
    raise UserError(f"--config.data.tokenizer={name}: expected one of {', '.join(TOKENIZERS)}")


def fingerprint(tokenizer: Tokenizer) -> str:
    """A digest of everything that decides the ids: the kind, a character vocabulary or the
    model file's bytes. Equal fingerprints encode every text alike."""
    described, model = tokenizer.saved_form()
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    if model is not None:
        digest.update(Path(model).read_bytes())
    return digest.hexdigest()[:16]


def matches_config(tokenizer: Tokenizer, data_config) -> bool:
    """Whether `tokenizer` (a saved one) is the one `data.tokenizer` and `data.tokenizer_model`
    ask for: the same kind and, where the config names a model file, the same contents. A
    character vocabulary comes from its corpus, so its kind is all the config can say."""
    kind = tokenizer.saved_form()[0]["kind"]
    if kind != data_config.tokenizer:
        return False
    if not data_config.tokenizer_model or kind == "char":
        return True
    wanted = make_tokenizer(kind, "", data_config.tokenizer_model)
    return fingerprint(wanted) == fingerprint(tokenizer)


TOKENIZER_DIR = "tokenizer"  # in the workdir
# The saved copy: one JSON file naming the kind; the model file beside it, if any.
SAVED_FILE = "tokenizer.json"
SAVED_MODEL_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "hf_tokenizer.json"}


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Write `tokenizer` into `directory` so `load_tokenizer` rebuilds it without the corpus.

    The JSON file is written last and renamed into place, so a reader finds either the
    previous copy or the whole new one, never a description whose model file is missing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved, model = tokenizer.saved_form()
    if model is not None:
        name = SAVED_MODEL_FILES[saved["kind"]]
        partial_model = directory / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(model, partial_model)
        partial_model.replace(directory / name)
        saved = {**saved, "model_file": name}
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
        if kind == "char":
            tokenizer = CharTokenizer(saved["chars"])
        elif kind in SAVED_MODEL_FILES:
            tokenizer = make_tokenizer(kind, "", str(Path(directory) / saved["model_file"]))
        else:
            tokenizer = make_tokenizer(kind, "")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read the saved tokenizer ({e}); delete it to rebuild "
                        "the tokenizer from the corpus") from None
    if tokenizer.vocab_size != saved.get("vocab_size", tokenizer.vocab_size):
        raise UserError(f"{path}: records {saved['vocab_size']} tokens but rebuilds "
                        f"{tokenizer.vocab_size}; the saved copy is damaged")
    return tokenizer
