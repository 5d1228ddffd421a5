"""Corpus-scale text: sources, the prepare step, packed windows, the mixture order, loading."""

import json

import numpy as np
import pytest
from conftest import run_cli

from scaling.config import experiments as config_lib
from scaling.data import loader as loader_lib
from scaling.data import prepare as prepare_lib
from scaling.data import text, text_sources
from scaling.data.packed_windows import WindowOrder, with_boundaries
from scaling.errors import UserError

TINY_MODEL = ["model.num_layers=1", "model.embed_dim=32", "model.num_heads=2",
              "model.num_kv_heads=1", "model.head_dim=16", "model.mlp_dim=64",
              "data.seq_len=32", "model.max_seq_len=32"]


def write_documents(directory, count=40, seed=0):
    """`count` small text files of different lengths, in two folders."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n", "é", "☃"]
    texts = {}
    for i in range(count):
        text_ = " ".join(rng.choice(words, int(rng.integers(5, 120))))
        path = directory / ("a" if i % 2 else "b") / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text_, encoding="utf-8")
        texts[str(path)] = text_
    return texts


def corpus_config(tmp_path, *overrides, sources=None):
    return config_lib.load_config("python_code_lm", [
        f"data.sources={sources or f'text:{tmp_path}/docs/**/*.txt'}",
        f"data.prepared_dir={tmp_path / 'prepared'}", "data.validation_fraction=0.2",
        "data.prepare_workers=2", *TINY_MODEL, *overrides])[0]


@pytest.fixture
def documents(tmp_path, monkeypatch):
    monkeypatch.setattr(text_sources, "MIN_UNIT_BYTES", 2000)  # several units and shards
    return write_documents(tmp_path / "docs")


def test_prepare_writes_every_document_once_with_its_eos(tmp_path, documents):
    manifests = prepare_lib.prepare(corpus_config(tmp_path))
    (manifest,) = manifests.values()
    ordered = [documents[p] for p in sorted(documents)]
    validation = [t for t in ordered if text_sources.in_validation(t, 0.2)]
    train = [t for t in ordered if not text_sources.in_validation(t, 0.2)]
    assert 0 < len(validation) < len(train)
    splits = manifest["splits"]
    assert len(splits["train"]["shards"]) > 2 and manifest["dtype"] == "uint16"
    for split, texts in (("train", train), ("validation", validation)):
        assert splits[split]["documents"] == len(texts)
        assert splits[split]["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    # The train stream is the documents in file order, each followed by EOS (256).
    corpus = text.load_text_corpus(corpus_config(tmp_path))
    stream = corpus.train_sources[0].stream
    tokens = stream.read(np.array([0]), stream.num_tokens)[0]
    expected = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), 256)
                               for t in train])
    np.testing.assert_array_equal(tokens, expected)


def test_windows_read_across_records_and_shards(tmp_path, documents, monkeypatch):
    monkeypatch.setattr(prepare_lib, "BLOCK_TOKENS", 64)  # many records per shard
    prepare_lib.prepare(corpus_config(tmp_path, "data.prepare_workers=1"))
    corpus = text.load_text_corpus(corpus_config(tmp_path))
    stream = corpus.train_sources[0].stream
    whole = stream.read(np.array([0]), stream.num_tokens)[0]
    starts = np.array([0, 63, 64, 1000, stream.num_tokens - 5])
    windows = stream.read(starts, 33)
    for start, window in zip(starts, windows, strict=True):
        real = whole[start:start + 33]
        np.testing.assert_array_equal(window[:len(real)], real)
        assert (window[len(real):] == -1).all()


def test_boundaries_follow_the_eos_ids():
    eos = 9
    tokens = np.array([[5, 6, eos, 7, 8, 8, eos, 4, -1, -1]])
    batch = with_boundaries(tokens, eos, "documents")
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, eos, 7, 8, 8, eos, 4, 0, 0]])
    assert set(with_boundaries(tokens, eos, "concat")) == {"tokens"}


def test_a_mixture_keeps_its_weights_deterministically():
    order = WindowOrder([5000, 300], [0.7, 0.3], seed=3)
    sources, windows = order.locate(np.arange(1000))
    assert abs(np.mean(sources == 0) - 0.7) < 0.02
    assert abs(np.mean(sources == 1) - 0.3) < 0.02
    again = WindowOrder([5000, 300], [0.7, 0.3], seed=3).locate(np.arange(1000))
    np.testing.assert_array_equal(again[0], sources)
    np.testing.assert_array_equal(again[1], windows)
    assert (windows[sources == 1] < 300).all() and (windows[sources == 0] < 5000).all()
    other_seed = WindowOrder([5000, 300], [0.7, 0.3], seed=4).locate(np.arange(1000))[1]
    assert not np.array_equal(other_seed, windows)


def test_one_source_sees_each_window_once_a_pass_in_a_new_order():
    order = WindowOrder([997], [1.0], seed=0)
    first = order.locate(np.arange(997))[1]
    second = order.locate(np.arange(997, 2 * 997))[1]
    assert sorted(first) == list(range(997)) and sorted(second) == list(range(997))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(997))
    # No permutation of the corpus is held: a position far into a huge corpus is computed.
    huge = WindowOrder([10**12], [1.0], seed=0).locate(np.array([10**12 - 1, 5]))[1]
    assert (huge < 10**12).all()


def test_the_loader_prefetches_exactly_the_rows_it_would_read(tmp_path, documents):
    prepare_lib.prepare(corpus_config(tmp_path))
    corpus = text.load_text_corpus(corpus_config(tmp_path))
    rows = np.array([1, 2, 5])
    ahead = loader_lib.TrainLoader(corpus, 0, 8, rows, 3, 9, prefetch_steps=3)
    inline = loader_lib.TrainLoader(corpus, 0, 8, rows, 3, 9, prefetch_steps=0)
    for num_steps in (2, 4):
        got, want = ahead.next(num_steps), inline.next(num_steps)
        assert set(got) == {"tokens", "segment_ids", "positions"}
        assert got["tokens"].shape == (num_steps, 3, 33)
        for key in got:
            np.testing.assert_array_equal(got[key], want[key])
    # Rows 1, 2, 5 of step 4 are rows 1, 2, 5 of the global batch, whoever reads them.
    whole = corpus.train_rows(0, 4, 8, np.arange(8))
    np.testing.assert_array_equal(inline.read(4)["tokens"], whole["tokens"][rows])


def test_eval_chunks_cover_each_window_once(tmp_path, documents):
    prepare_lib.prepare(corpus_config(tmp_path))
    corpus = text.load_text_corpus(corpus_config(tmp_path))
    size = corpus.eval_size("validation")
    seen = []
    for chunk in loader_lib.eval_chunks(corpus, "validation", 4, np.arange(4),
                                        batches_per_call=2):
        assert chunk["tokens"].shape == (2, 4, 33)
        seen.append(chunk["mask"].sum())
    assert sum(seen) == size


def test_prepare_resumes_after_an_interrupt_and_refuses_another_tokenizer(
        tmp_path, documents, capsys):
    bad = tmp_path / "docs" / "z" / "bad.txt"   # the last unit: sorted after a/ and b/
    bad.parent.mkdir()
    bad.write_bytes(b"caf\xe9 not utf-8")
    config = corpus_config(tmp_path, "data.prepare_workers=1")
    with pytest.raises(UserError, match=r"bad.txt: not UTF-8 text \(byte 3\).*on_malformed"):
        prepare_lib.prepare(config)
    directory = next((tmp_path / "prepared").glob("text-*"))
    done = len(list((directory / "units").glob("*.json")))
    assert done > 1 and not (directory / "manifest.json").exists()
    assert not list(directory.glob(".*tmp*"))  # the failed unit's staged shard is gone
    bad.write_text("now it is text")
    capsys.readouterr()
    prepare_lib.prepare(config)
    assert f"resuming; {done} of" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    fresh_config = corpus_config(tmp_path, f"data.prepared_dir={fresh}")
    assert prepare_lib.prepare(fresh_config) == prepare_lib.prepare(config)
    with pytest.raises(UserError, match="another tokenizer"):
        prepare_lib.prepare(corpus_config(tmp_path, "data.tokenizer=char"))


def test_malformed_records_are_refused_or_counted(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(30)]
    lines[7] = json.dumps({"body": "no text field"})
    lines[12] = "{not json"
    (tmp_path / "docs" / "part.jsonl").write_text("\n".join(lines) + "\n")
    sources = f"jsonl:{tmp_path}/docs/*.jsonl"
    with pytest.raises(UserError, match=r"part.jsonl:8: no text field 'text'"):
        prepare_lib.prepare(corpus_config(tmp_path, sources=sources))
    manifests = prepare_lib.prepare(corpus_config(tmp_path, "data.on_malformed=skip",
                                                  sources=sources))
    (manifest,) = manifests.values()
    assert manifest["malformed"] == 2 and "part.jsonl:8" in manifest["first_malformed"]
    assert sum(s["documents"] for s in manifest["splits"].values()) == 28
    assert "2 malformed records skipped" in capsys.readouterr().err


@pytest.mark.parametrize("setup, sources, message", [
    (None, "text:{tmp}/nothing/*.txt", "matches no file"),
    ("empty", "text:{tmp}/docs/*.txt", "every matching file is empty"),
    ("latin-1", "text:{tmp}/docs/*.txt", "a.txt: not UTF-8 text (byte 3)"),
    ("jsonl", "jsonl:{tmp}/docs/*.jsonl", "a.jsonl:2: no text field 'text'"),
    (None, "csv:{tmp}/x.csv", "has no known kind"),
    (None, "text:{tmp}/docs/*.txt@-1", "weight after @ must be a positive number"),
])
def test_bad_sources_exit_2_with_one_line(tmp_path, setup, sources, message):
    (tmp_path / "docs").mkdir()
    if setup == "empty":
        (tmp_path / "docs" / "a.txt").write_text("")
    if setup == "latin-1":
        (tmp_path / "docs" / "a.txt").write_bytes("café".encode("latin-1"))
    if setup == "jsonl":
        (tmp_path / "docs" / "a.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    result = run_cli("--experiment=python_code_lm", "--mode=prepare",
                     f"--config.data.sources={sources.format(tmp=tmp_path)}",
                     f"--config.data.prepared_dir={tmp_path / 'prepared'}")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_training_refuses_an_unprepared_or_mismatched_corpus(tmp_path, documents):
    args = ["--experiment=python_code_lm", f"--workdir={tmp_path / 'run'}",
            f"--config.data.sources=text:{tmp_path}/docs/**/*.txt",
            f"--config.data.prepared_dir={tmp_path / 'prepared'}"]
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("not prepared" in result.stderr and "python -m scaling.main "
            "--experiment=python_code_lm --mode=prepare" in result.stderr), result.stderr
    prepare_lib.prepare(corpus_config(tmp_path))
    result = run_cli(*args, "--config.data.tokenizer=char")
    assert result.returncode == 2 and "prepared with another tokenizer" in result.stderr


def test_huggingface_tokenizer_json(tmp_path, documents):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(list(documents.values()), trainer)
    path = tmp_path / "tokenizer.json"
    model.save(str(path))
    config = corpus_config(tmp_path, "data.tokenizer=huggingface",
                           f"data.tokenizer_model={path}", "data.prepare_workers=1")
    (manifest,) = prepare_lib.prepare(config).values()
    assert manifest["tokenizer"]["eos_id"] == 2 and manifest["tokenizer"]["bos_id"] == 1
    corpus = text.load_text_corpus(config)
    sample = "def beta(x) return é <|end_of_text|>"
    ids = corpus.tokenizer.encode(sample)
    assert 2 not in ids and corpus.tokenizer.decode(ids) == sample  # literal, not special
    first = corpus.train_sources[0].stream.read(np.array([0]), 1)[0]
    assert first[0] == 1  # each document opens with BOS


def test_prepare_trains_a_sentencepiece_model_when_none_is_given(tmp_path, documents):
    pytest.importorskip("sentencepiece")
    config = corpus_config(tmp_path, "data.tokenizer=sentencepiece",
                           "data.sentencepiece_vocab_size=300", "data.prepare_workers=1")
    (manifest,) = prepare_lib.prepare(config).values()
    corpus = text.load_text_corpus(config)
    assert manifest["tokenizer"]["kind"] == "sentencepiece"
    assert corpus.tokenizer.vocab_size == 300
    assert corpus.tokenizer.decode(corpus.tokenizer.encode("alpha beta")) == "alpha beta"


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "docs").mkdir()
    texts = [f"row {i} " * (i + 3) for i in range(25)]
    pq.write_table(pa.table({"body": texts, "id": list(range(25))}),
                   tmp_path / "docs" / "part.parquet")
    sources = f"parquet:{tmp_path}/docs/*.parquet"
    with pytest.raises(UserError, match="no column 'text'; columns: body, id"):
        prepare_lib.prepare(corpus_config(tmp_path, sources=sources))
    (manifest,) = prepare_lib.prepare(corpus_config(tmp_path, "data.text_field=body",
                                                    sources=sources)).values()
    assert sum(s["documents"] for s in manifest["splits"].values()) == 25
    assert sum(s["tokens"] for s in manifest["splits"].values()) == sum(
        len(t) + 1 for t in texts)


class FakeTfdsSource:
    """A TFDS random-access data source: records are dicts of features, text as bytes."""

    def __init__(self, texts):
        self.records = [{"text": t.encode()} for t in texts]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def test_a_tfds_source_keeps_its_own_splits(tmp_path, monkeypatch):
    splits = {"train": [f"train document {i}" for i in range(30)],
              "validation": [f"held out {i}" for i in range(5)]}
    monkeypatch.setattr(text_sources, "_tfds_split_sizes",
                        lambda name, options: {s: len(t) for s, t in splits.items()})
    monkeypatch.setattr(text_sources, "_tfds_data_source",
                        lambda name, split, options: FakeTfdsSource(splits[split]))
    config = corpus_config(tmp_path, "data.prepare_workers=1", sources="tfds:fake_corpus")
    (manifest,) = prepare_lib.prepare(config).values()
    for split, texts in splits.items():
        assert manifest["splits"][split]["documents"] == len(texts)
        assert manifest["splits"][split]["tokens"] == sum(len(t) + 1 for t in texts)
    corpus = text.load_text_corpus(config)
    stream = corpus.eval_splits["validation"].stream
    assert corpus.tokenizer.decode(stream.read(np.array([0]), 10)[0]) == "held out 0"


def test_prepare_then_train_from_the_command_line(tmp_path, documents):
    common = ["--experiment=python_code_lm",
              f"--config.data.sources=text:{tmp_path}/docs/**/*.txt",
              f"--config.data.prepared_dir={tmp_path / 'prepared'}",
              "--config.data.validation_fraction=0.2", *[f"--config.{o}" for o in TINY_MODEL]]
    prepared = run_cli(*common, "--mode=prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert "ETA" in prepared.stderr
    assert (f"train with: python -m scaling.main --experiment=python_code_lm "
            f"--config.data.prepared_dir={tmp_path / 'prepared'}") in prepared.stdout
    trained = run_cli(*common, f"--workdir={tmp_path / 'run'}", "--config.num_steps=4",
                      "--config.optimizer.warmup_steps=1", "--config.batch_size=8",
                      "--config.eval_batch_size=8", "--config.steps_per_call=2",
                      "--config.log_every_steps=2")
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(0 <= r["data_wait_fraction"] < 1 for r in train)
    assert any(r["split"] == "validation" for r in records)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
