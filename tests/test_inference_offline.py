"""Predict, export and sample need only the workdir: the data can be gone after training."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli

import scaling.data
import scaling.training.optimizer
import scaling.training.run
from scaling.config import experiments as config_lib
from scaling.data import heldout
from scaling.data.idx import read_idx
from scaling.data.tokenizer import TOKENIZER_DIR, ByteTokenizer, load_tokenizer, save_tokenizer
from scaling.errors import UserError
from scaling.inference import export, predict, sample

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("inference_offline")

MLP = ["--config.num_steps=16", "--config.batch_size=32", "--config.eval_batch_size=96",
       "--config.steps_per_call=8", "--config.log_every_steps=8"]
LM = ["--config.num_steps=4", "--config.steps_per_call=4", "--config.optimizer.warmup_steps=1",
      "--config.model.num_layers=1", "--config.model.embed_dim=32",
      "--config.model.mlp_dim=64", "--config.model.head_dim=8"]


def printed_text(stdout: str) -> str:
    """What --mode=sample printed after its one header line (the text may hold newlines)."""
    return stdout.split("\n", 1)[1].removesuffix("\n")


def overrides(args, manual_dir):
    return [a.removeprefix("--config.") for a in args] + [f"data.manual_dir={manual_dir}"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, tiny_idx_dir):
    """A trained classifier whose IDX files were deleted after training."""
    root = tmp_path_factory.mktemp("mlp_offline")
    data, workdir = root / "data", root / "run"
    shutil.copytree(tiny_idx_dir, data)
    args = ["--experiment=fashion_mnist_mlp", f"--workdir={workdir}",
            f"--config.data.manual_dir={data}", *MLP]
    trained = run_cli(*args)
    assert trained.returncode == 0, trained.stderr
    shutil.rmtree(data)
    return {"args": args, "workdir": workdir, "data": data,
            "images": read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz"),
            "labels": read_idx(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz")}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, shakespeare_dir):
    """A trained character LM, sampled once with its corpus present, then the corpus deleted."""
    root = tmp_path_factory.mktemp("lm_offline")
    data, workdir = root / "data", root / "run"
    data.mkdir()
    shutil.copy(shakespeare_dir / "input.txt", data / "input.txt")
    args = ["--experiment=shakespeare_char_lm", f"--workdir={workdir}",
            f"--config.data.manual_dir={data}", f"--config.data.prepared_dir={root / 'corpus'}",
            *LM]
    trained = run_cli(*args)
    assert trained.returncode == 0, trained.stderr
    sampling = [*args, "--mode=sample", "--prompt=ROMEO:", "--max_new_tokens=24",
                "--sample_seed=3"]
    with_corpus = run_cli(*sampling)
    assert with_corpus.returncode == 0, with_corpus.stderr
    characters = len(set((data / "input.txt").read_text()))
    shutil.rmtree(data)
    shutil.rmtree(root / "corpus")  # the prepared corpus too: nothing of the text is left
    return {"args": args, "workdir": workdir, "data": data, "sampling": sampling,
            "with_corpus": printed_text(with_corpus.stdout), "characters": characters}


def test_export_and_predict_run_after_the_data_is_gone(mlp_run, tmp_path):
    assert not mlp_run["data"].exists()
    exported = run_cli(*mlp_run["args"], "--mode=export")
    assert exported.returncode == 0, exported.stderr
    assert "on the held-out sample of 300 of its 300 examples" in exported.stdout
    metadata = json.loads((mlp_run["workdir"] / "export" / "metadata.json").read_text())
    test = metadata["accuracy"]["test"]
    assert test["examples"] == 300 and test["agreement"] == 1.0

    sample = heldout.load_sample(mlp_run["workdir"])["test"]
    assert np.array_equal(sample["label"], mlp_run["labels"])  # a small split is kept whole
    images = tmp_path / "images.npy"
    np.save(images, sample["image"])
    output = tmp_path / "out.jsonl"
    predicted = run_cli(*mlp_run["args"], "--mode=predict", f"--inputs={images}",
                        f"--output={output}")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 300 and all(row["name"] for row in rows)
    # Export's reported accuracy is that of these same predictions.
    labels = np.array([row["label"] for row in rows])
    assert np.mean(labels == sample["label"]) == pytest.approx(test["checkpoint"], abs=1e-9)


def test_a_split_still_needs_the_data(mlp_run):
    result = run_cli(*mlp_run["args"], "--mode=predict", "--inputs=split:test")
    assert result.returncode == 2
    assert "--inputs=split:test: needs the dataset" in result.stderr


def test_export_without_a_held_out_sample_says_the_check_was_skipped(mlp_run, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(mlp_run["workdir"], legacy, ignore=shutil.ignore_patterns("export"))
    (legacy / heldout.FILE_NAME).unlink()
    args = [a if not a.startswith("--workdir=") else f"--workdir={legacy}"
            for a in mlp_run["args"]]
    result = run_cli(*args, "--mode=export")
    assert result.returncode == 0, result.stderr
    assert "accuracy check skipped" in result.stdout
    assert json.loads((legacy / "export" / "metadata.json").read_text())["accuracy"] is None


def test_sampling_uses_the_saved_tokenizer_after_the_corpus_is_gone(lm_run):
    assert not lm_run["data"].exists()
    saved = load_tokenizer(lm_run["workdir"] / TOKENIZER_DIR)
    assert saved.vocab_size == lm_run["characters"] + 1  # and the end-of-document id
    first = run_cli(*lm_run["sampling"])
    again = run_cli(*lm_run["sampling"])
    assert first.returncode == 0, first.stderr
    text = printed_text(first.stdout)
    assert text == printed_text(again.stdout) == lm_run["with_corpus"]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 24


def test_a_workdir_without_a_saved_tokenizer_needs_its_corpus(lm_run, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(lm_run["workdir"], legacy)
    shutil.rmtree(legacy / TOKENIZER_DIR)
    config, module = config_lib.load_config(
        "shakespeare_char_lm", overrides(LM, lm_run["data"])
        + [f"data.prepared_dir={lm_run['data'].parent / 'corpus'}"])
    options = sample.SampleOptions("ROMEO:", 4, 0.0, 0, 0)
    with pytest.raises(UserError, match="no saved tokenizer.*re-run training"):
        sample.sample_from_checkpoint(config, legacy, options, module)


def test_saved_tokenizers_round_trip(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path / "bytes")
    tokenizer = load_tokenizer(tmp_path / "bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    assert load_tokenizer(tmp_path / "absent") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="cannot read the saved tokenizer"):
        load_tokenizer(tmp_path / "broken")


@pytest.fixture
def no_data_or_optimizer(monkeypatch):
    """Any attempt to load a dataset or build an optimizer or a training run fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("inference must not load data or build the optimizer")

    monkeypatch.setattr(scaling.data, "load_dataset", refuse)
    monkeypatch.setattr(scaling.training.optimizer, "make_optimizer", refuse)
    monkeypatch.setattr(scaling.training.run, "setup", refuse)
    monkeypatch.setattr(scaling.training.run, "build_run", refuse)


def test_inference_builds_neither_the_dataset_nor_the_optimizer(
        mlp_run, lm_run, tmp_path, no_data_or_optimizer):
    config, module = config_lib.load_config("fashion_mnist_mlp",
                                            overrides(MLP, mlp_run["data"]))
    images = tmp_path / "images.npy"
    np.save(images, mlp_run["images"][:5])
    summary = predict.predict_to_file(
        config, mlp_run["workdir"],
        predict.PredictOptions(inputs=str(images), output=str(tmp_path / "p.jsonl")), module)
    assert "predicted 5 inputs" in summary
    report = export.export_checkpoint(
        config, mlp_run["workdir"], export.ExportOptions(artifact=str(tmp_path / "art")), module)
    assert "held-out sample" in report

    config, module = config_lib.load_config("shakespeare_char_lm",
                                            overrides(LM, lm_run["data"]))
    text = sample.sample_from_checkpoint(config, lm_run["workdir"],
                                         sample.SampleOptions("ROMEO:", 24, 0.8, 40, 3), module)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 24


def test_a_changed_model_is_still_refused_by_the_params_only_restore(mlp_run):
    config, module = config_lib.load_config(
        "fashion_mnist_mlp", overrides(MLP, mlp_run["data"]) + ["model.hidden_sizes=(64, 128)"])
    with pytest.raises(UserError) as error:
        predict.load_predictor(config, mlp_run["workdir"], experiment=module)
    message = str(error.value)
    assert "params/hidden_0/kernel: float32[784,128] in the checkpoint, float32[784,64]" in message
    assert "opt_state" not in message and "(3 mismatched paths)" in message
