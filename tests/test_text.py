"""Tokenizers and packed text windows."""

import ml_collections
import numpy as np
import pytest

from scaling.data import text
from scaling.data.tokenizer import ByteTokenizer, CharTokenizer, make_tokenizer
from scaling.errors import UserError


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tokenizer = CharTokenizer("hello world")
    ids = tokenizer.encode("hold")
    assert tokenizer.vocab_size == 8 and ids.dtype == np.int32
    assert tokenizer.decode(ids) == "hold"
    with pytest.raises(UserError, match="'z'"):
        tokenizer.encode("zoo")


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("naïve ☃")) == "naïve ☃"


def test_sentencepiece_needs_a_model_file():
    with pytest.raises(UserError, match="sentencepiece|tokenizer_model=/no/such/model"):
        make_tokenizer("sentencepiece", "", "/no/such/model")


def test_split_matches_the_tfds_builder():
    splits = text.split_like_tfds("x" * 1000)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [900, 50, 50]


def test_training_windows_overlap_by_one_token():
    windows = text.training_windows(np.arange(11), seq_len=4)
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])


def test_eval_windows_cover_every_target_once():
    tokens = np.arange(1, 12)            # 10 targets
    windows = text.eval_windows(tokens, seq_len=4)
    assert windows["tokens"].shape == (3, 5)
    targets = windows["tokens"][:, 1:][windows["weights"] > 0]
    np.testing.assert_array_equal(targets, np.arange(2, 12))


def test_tiny_shakespeare_from_the_manual_directory(shakespeare_dir):
    config = ml_collections.ConfigDict({
        "name": "tiny_shakespeare", "manual_dir": str(shakespeare_dir), "tfds_data_dir": "",
        "tokenizer": "char", "tokenizer_model": "", "seq_len": 128,
        "eval_splits": ("validation", "test")})
    data = text.load_text_dataset(config)
    assert data.tokenizer.vocab_size == 65
    assert data.train["tokens"].shape == ((1003854 - 1) // 128, 129)
    assert int(data.eval_splits["validation"]["weights"].sum()) == 55770 - 1
    assert data.tokenizer.decode(data.train["tokens"][0][:14]) == "First Citizen:"


def test_missing_text_lists_the_options(tmp_path):
    config = ml_collections.ConfigDict({
        "name": "tiny_shakespeare", "manual_dir": str(tmp_path), "tfds_data_dir": "",
        "tokenizer": "char", "tokenizer_model": "", "seq_len": 8, "eval_splits": ("test",)})
    with pytest.raises(UserError, match="--config.data.manual_dir=.*input.txt"):
        text.load_text_dataset(config)


def test_sentencepiece_model_file_tokenizes_the_corpus(tmp_path, shakespeare_dir):
    sentencepiece = pytest.importorskip("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        input=str(shakespeare_dir / "input.txt"), model_prefix=str(tmp_path / "sp"),
        vocab_size=300, model_type="bpe", character_coverage=1.0, minloglevel=2)
    config = ml_collections.ConfigDict({
        "name": "tiny_shakespeare", "manual_dir": str(shakespeare_dir), "tfds_data_dir": "",
        "tokenizer": "sentencepiece", "tokenizer_model": str(tmp_path / "sp.model"),
        "seq_len": 64, "eval_splits": ("validation", "test")})
    data = text.load_text_dataset(config)
    assert data.tokenizer.vocab_size == 300
    assert data.train["tokens"].max() < 300
    # Subword pieces pack several characters per token.
    assert data.train["tokens"].shape[0] * 64 < 1003854 / 2
    assert data.tokenizer.decode(data.tokenizer.encode("ROMEO: hello")) == "ROMEO: hello"
    assert set(data.eval_splits) == {"validation", "test"}
