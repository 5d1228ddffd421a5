"""Tokenizers and packed text windows."""

import numpy as np
import pytest

from scaling.config import experiments as config_lib
from scaling.data import text, text_sources
from scaling.data.tokenizer import ByteTokenizer, CharTokenizer, make_tokenizer
from scaling.errors import UserError


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tokenizer = CharTokenizer("hello world")
    ids = tokenizer.encode("hold")
    assert tokenizer.vocab_size == 8 + 1 and tokenizer.eos_id == 8 and ids.dtype == np.int32
    assert tokenizer.decode(ids) == "hold"
    assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == "hold"  # specials unprinted
    with pytest.raises(UserError, match="'z'"):
        tokenizer.encode("zoo")


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("naïve ☃")) == "naïve ☃"


def test_sentencepiece_needs_a_model_file():
    with pytest.raises(UserError, match="sentencepiece|tokenizer_model=/no/such/model"):
        make_tokenizer("sentencepiece", "", "/no/such/model")


def test_split_matches_the_tfds_builder():
    splits = text_sources.split_like_tfds("x" * 1000)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [900, 50, 50]


def shakespeare_config(shakespeare_dir, tmp_path, *overrides):
    return config_lib.load_config("shakespeare_char_lm", [
        f"data.manual_dir={shakespeare_dir}", f"data.prepared_dir={tmp_path / 'corpus'}",
        "data.eval_splits=validation,test", *overrides])[0]


def split_lengths(shakespeare_dir) -> tuple[str, int, int]:
    """The corpus, and the characters in its train and validation splits (90%, then 5%)."""
    corpus = (shakespeare_dir / "input.txt").read_text()
    train = int(len(corpus) * 0.9)
    return corpus, train, int((len(corpus) - train) * 0.5)


def test_tiny_shakespeare_through_the_prepared_corpus(shakespeare_dir, tmp_path):
    corpus, train, validation = split_lengths(shakespeare_dir)
    data = text.load_text_corpus(shakespeare_config(shakespeare_dir, tmp_path))
    assert data.tokenizer.vocab_size == len(set(corpus)) + 1  # the characters and the EOS id
    assert data.num_train == (train + 1 - 1) // 128           # the split's text and its EOS
    first = data.train_sources[0].read(np.array([0]))["tokens"][0]
    assert first.shape == (129,) and data.tokenizer.decode(first[:14]) == "First Citizen:"
    assert data.eval_size("validation") == -(-validation // 128)
    weights = sum(float(data.eval_rows("validation", np.arange(i, i + 1))["weights"].sum())
                  for i in range(data.eval_size("validation")))
    assert weights == validation  # every target of the split once: its text, then its EOS


def test_missing_text_lists_the_options(tmp_path):
    config = config_lib.load_config("shakespeare_char_lm", [
        f"data.manual_dir={tmp_path}", f"data.prepared_dir={tmp_path / 'corpus'}"])[0]
    with pytest.raises(UserError, match="--config.data.manual_dir=.*input.txt"):
        text.load_text_corpus(config)


def test_sentencepiece_model_file_tokenizes_the_corpus(tmp_path, shakespeare_dir):
    sentencepiece = pytest.importorskip("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        input=str(shakespeare_dir / "input.txt"), model_prefix=str(tmp_path / "sp"),
        vocab_size=300, model_type="bpe", character_coverage=1.0, minloglevel=2)
    config = shakespeare_config(shakespeare_dir, tmp_path, "data.tokenizer=sentencepiece",
                                f"data.tokenizer_model={tmp_path / 'sp.model'}",
                                "data.seq_len=64", "model.max_seq_len=64")
    data = text.load_text_corpus(config)
    assert data.tokenizer.vocab_size == 300
    window = data.train_sources[0].read(np.arange(data.num_train))["tokens"]
    assert window.max() < 300
    # Subword pieces pack several characters per token.
    assert data.num_train * 64 < split_lengths(shakespeare_dir)[1] / 2
    assert data.tokenizer.decode(data.tokenizer.encode("ROMEO: hello")) == "ROMEO: hello"
    assert set(data.eval_splits) == {"validation", "test"}


def test_sampling_ends_where_the_model_ends_its_document(monkeypatch):
    from types import SimpleNamespace

    import jax.numpy as jnp

    from scaling.inference import sample

    tokenizer = CharTokenizer("abc")
    produced = [0, 1, tokenizer.eos_id, 2]   # "a", "b", end of document, "c"
    monkeypatch.setattr(sample, "generate",
                        lambda *args, num_new, **kwargs: jnp.asarray([produced[:num_new]]))
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=16))
    options = sample.SampleOptions("c", 4, 0.0, 0, 0)
    assert sample.sample_text(model, None, tokenizer, options) == "cab"
