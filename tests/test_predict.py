"""Predict and export: a tiny trained classifier, its predictions, and its exported artifact
run in a fresh process that never imports flax."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image

from scaling import serving
from scaling.config import experiments as config_lib
from scaling.data.idx import read_idx
from scaling.data.images import LABEL_NAMES
from scaling.errors import UserError
from scaling.inference import export, predict

# The tests share a module fixture that is costly to build: one worker builds it once.
pytestmark = pytest.mark.xdist_group("predict")

TRAIN = ["--config.num_steps=16", "--config.batch_size=32", "--config.eval_batch_size=100",
         "--config.steps_per_call=8", "--config.checkpoint_every_steps=8",
         "--config.log_every_steps=8"]


def cli(workdir, tiny_idx_dir, *args):
    return run_cli("--experiment=fashion_mnist_mlp", f"--workdir={workdir}",
                   f"--config.data.manual_dir={tiny_idx_dir}", *TRAIN, *args)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_idx_dir):
    """A workdir with checkpoints at steps 8 and 16, its test-split predictions and export."""
    workdir = tmp_path_factory.mktemp("trained")
    result = cli(workdir, tiny_idx_dir)
    assert result.returncode == 0, result.stderr
    predicted = cli(workdir, tiny_idx_dir, "--mode=predict", "--inputs=split:test")
    assert predicted.returncode == 0, predicted.stderr
    exported = cli(workdir, tiny_idx_dir, "--mode=export")
    assert exported.returncode == 0, exported.stderr
    return {"workdir": workdir, "predict_stdout": predicted.stdout,
            "export_stdout": exported.stdout,
            "predictions": read_jsonl(workdir / "predictions.jsonl")}


def test_predict_on_a_split_agrees_with_evaluation(trained, tiny_idx_dir):
    rows = trained["predictions"]
    labels = read_idx(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz")
    assert [row["input"] for row in rows] == [f"test[{i}]" for i in range(len(labels))]
    assert [row["target"] for row in rows] == labels.tolist()
    names = LABEL_NAMES["fashion_mnist"]
    for row in rows:
        probabilities = [entry["probability"] for entry in row["top_k"]]
        assert len(probabilities) == predict.DEFAULT_TOP_K
        assert probabilities == sorted(probabilities, reverse=True)
        assert row["top_k"][0]["label"] == row["label"] and row["name"] == names[row["label"]]
        assert all(entry["name"] == names[entry["label"]] for entry in row["top_k"])
    # The same forward pass as evaluation: the accuracy matches the final test evaluation.
    accuracy = np.mean([row["label"] == row["target"] for row in rows])
    final = [json.loads(line) for line in (trained["workdir"] / "metrics.jsonl").open()]
    final_test = [r for r in final if r["split"] == "test" and r["step"] == 16][-1]
    assert accuracy == pytest.approx(final_test["accuracy"], abs=1e-9)
    assert f"accuracy {accuracy:.4f}" in trained["predict_stdout"]


LOADER_SCRIPT = """
import json, sys
import numpy as np
import scaling.serving
images = np.load(sys.argv[2])
float_model = scaling.serving.load(sys.argv[1] + "/export")
int8_model = scaling.serving.load(sys.argv[1] + "/int8")
one = float_model.predict(images[:1], top_k=3)
out = {"float": float_model.predict(images, top_k=3), "int8": int8_model.predict(images),
       "one": one, "int8_meta": int8_model.metadata}
leaked = [m for m in sys.modules if m == "flax" or m.startswith(("flax.", "scaling.training.loop",
          "scaling.models", "scaling.data", "scaling_experiment"))]
out["leaked"] = leaked
print(json.dumps(out))
"""


def test_export_runs_in_a_fresh_process_without_flax_and_matches_predict(
        trained, tiny_idx_dir, tmp_path):
    workdir = trained["workdir"]
    quantized = cli(workdir, tiny_idx_dir, "--mode=export", "--quantize=int8",
                    f"--artifact={workdir / 'int8'}")
    assert quantized.returncode == 0, quantized.stderr
    assert "test accuracy: checkpoint" in quantized.stdout
    images_file = tmp_path / "test_images.npy"
    np.save(images_file, read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz"))
    result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(workdir), str(images_file)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["leaked"] == []

    expected = trained["predictions"]
    assert len(out["float"]) == len(expected) == 300
    for got, want in zip(out["float"], expected, strict=True):
        assert got["label"] == want["label"] and got["name"] == want["name"]
        assert [e["label"] for e in got["top_k"]] == [e["label"] for e in want["top_k"]]
        assert [e["probability"] for e in got["top_k"]] == pytest.approx(
            [e["probability"] for e in want["top_k"]], abs=1e-6)
    assert out["one"][0]["label"] == expected[0]["label"]  # a batch of one: symbolic batch

    metadata = out["int8_meta"]
    assert metadata["quantization"] is not None
    assert metadata["weights"]["bytes"] < 0.3 * metadata["weights"]["float_bytes"]
    test = metadata["accuracy"]["test"]
    int8_labels = np.array([r["label"] for r in out["int8"]])
    targets = np.array([r["target"] for r in expected])
    assert test["artifact"] == pytest.approx(np.mean(int8_labels == targets))
    assert test["checkpoint"] == pytest.approx(np.mean([r["label"] == r["target"]
                                                        for r in expected]))
    assert test["artifact"] >= test["checkpoint"] - 0.05


def test_predict_reads_png_jpeg_and_npy_with_a_chosen_checkpoint(trained, tiny_idx_dir,
                                                                 tmp_path):
    images = read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(images[0]).save(inputs / "a.png")
    Image.fromarray(images[1]).convert("RGB").save(inputs / "b.png")  # colour: to grayscale
    Image.fromarray(images[2]).save(inputs / "c.jpg", quality=95)
    np.save(inputs / "d.npy", images[3:6])
    (inputs / "notes.txt").write_text("ignored: not an image file")
    output = tmp_path / "out.csv"
    result = cli(trained["workdir"], tiny_idx_dir, "--mode=predict", f"--inputs={inputs}",
                 f"--output={output}", "--top_k=2", "--checkpoint_step=16")
    assert result.returncode == 0, result.stderr
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["input"] for row in rows] == [
        str(inputs / "a.png"), str(inputs / "b.png"), str(inputs / "c.jpg"),
        *(f"{inputs / 'd.npy'}[{i}]" for i in range(3))]
    assert "top2_probability" in rows[0] and "top3_label" not in rows[0]
    expected = trained["predictions"]
    lossless = {0: rows[0], 1: rows[1], 3: rows[3], 4: rows[4], 5: rows[5]}  # not the JPEG
    for index, row in lossless.items():
        assert int(row["label"]) == expected[index]["label"]
        assert float(row["top1_probability"]) == pytest.approx(
            expected[index]["top_k"][0]["probability"], abs=1e-6)
    assert rows[2]["name"] == LABEL_NAMES["fashion_mnist"][int(rows[2]["label"])]

    earlier = tmp_path / "step8.jsonl"
    result = cli(trained["workdir"], tiny_idx_dir, "--mode=predict", "--inputs=split:test",
                 "--checkpoint_step=8", f"--output={earlier}")
    assert result.returncode == 0, result.stderr
    assert "checkpoint of step 8" in result.stdout
    step8 = read_jsonl(earlier)
    assert [r["top_k"][0]["probability"] for r in step8] != [
        r["top_k"][0]["probability"] for r in expected]


@pytest.fixture(scope="module")
def tiny_config(tiny_idx_dir):
    # Eight fake devices in this process: the eval batch must split over them.
    return config_lib.load_config("fashion_mnist_mlp", [
        f"data.manual_dir={tiny_idx_dir}", "batch_size=32", "eval_batch_size=96"])


def make_inputs(directory):
    directory.mkdir()
    (directory / "empty").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(directory / "big.png")
    (directory / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(directory / "ok.png")
    (directory / "cut.png").write_bytes((directory / "ok.png").read_bytes()[:40])
    np.save(directory / "float.npy", np.zeros((28, 28), np.float32))
    np.save(directory / "shape.npy", np.zeros((3, 27, 28), np.uint8))
    (directory / "data.csv").write_text("1,2,3")


@pytest.mark.parametrize("inputs, output, extra, fragments", [
    ("missing", None, {}, ["--inputs=", "no such file or directory"]),
    ("empty", None, {}, ["holds no PNG, JPEG or NPY files"]),
    ("big.png", None, {}, ["big.png is 32x32", "28x28"]),
    ("text.png", None, {}, ["text.png is not a readable image"]),
    ("cut.png", None, {}, ["cut.png"]),
    ("float.npy", None, {}, ["float.npy", "float32 values"]),
    ("shape.npy", None, {}, ["shape.npy", "shape [3, 27, 28]"]),
    ("data.csv", None, {}, ["data.csv is not a PNG, JPEG or NPY file"]),
    ("split:validation", None, {}, ["--inputs=split:validation", "unknown split",
                                    "split:train, split:test"]),
    ("ok.png", "nowhere/out.jsonl", {}, ["--output=", "does not exist"]),
    ("ok.png", "out.txt", {}, ["--output=", ".jsonl or .csv"]),
    ("ok.png", None, {"checkpoint_step": 5}, ["--checkpoint_step=5", "available steps: 8, 16"]),
    ("ok.png", None, {"top_k": 11}, ["--top_k=11", "10 classes"]),
    (None, None, {}, ["--inputs is required"]),
])
def test_predict_mistakes_are_user_errors_and_write_nothing(
        trained, tiny_config, tmp_path, inputs, output, extra, fragments):
    make_inputs(tmp_path / "in")
    config, module = tiny_config
    written = tmp_path / (output or "default.jsonl")
    options = predict.PredictOptions(
        inputs=inputs if inputs is None or inputs.startswith("split:")
        else str(tmp_path / "in" / inputs), output=str(written), **extra)
    with pytest.raises(UserError) as raised:
        predict.predict_to_file(config, trained["workdir"], options, module)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert not written.exists()


def test_cli_predict_mistake_exits_2_with_one_line(trained, tiny_idx_dir, tmp_path):
    result = cli(trained["workdir"], tiny_idx_dir, "--mode=predict", "--inputs=split:test",
                 f"--output={tmp_path / 'missing' / 'out.csv'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not exist" in errors[0]


def test_export_mistakes_are_user_errors(trained, tiny_config, tmp_path):
    config, module = tiny_config
    with pytest.raises(UserError, match="--quantize=int4"):
        export.export_checkpoint(config, trained["workdir"],
                                 export.ExportOptions(quantize="int4"), module)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("someone's file")
    with pytest.raises(UserError, match="not an exported model"):
        export.export_checkpoint(config, trained["workdir"],
                                 export.ExportOptions(artifact=str(occupied)), module)
    assert (occupied / "keep.txt").read_text() == "someone's file"
    with pytest.raises(UserError, match="not an exported model"):
        serving.load(occupied)


def test_a_workdir_without_checkpoints_is_a_user_error(tiny_config, tmp_path):
    config, module = tiny_config
    with pytest.raises(UserError, match="no checkpoint.*train first"):
        predict.predict_to_file(config, tmp_path, predict.PredictOptions(inputs="split:test"),
                                module)
    with pytest.raises(UserError, match="no checkpoint.*train first"):
        export.export_checkpoint(config, tmp_path, export.ExportOptions(), module)
    assert not (tmp_path / "export").exists()


def test_language_models_cannot_be_predicted_or_exported(tmp_path):
    config, module = config_lib.load_config("shakespeare_char_lm", [])
    with pytest.raises(UserError, match="needs a classification experiment.*--mode=sample"):
        predict.predict_to_file(config, tmp_path, predict.PredictOptions(inputs="split:test"),
                                module)
    with pytest.raises(UserError, match="--mode=export needs a classification experiment"):
        export.export_checkpoint(config, tmp_path, export.ExportOptions(), module)


def test_int8_quantization_rounds_each_weight_to_half_a_step():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(20, 6)).astype(np.float32),
                        "bias": rng.normal(size=(6,)).astype(np.float32)},
              "zero": {"kernel": np.zeros((4, 3), np.float32)}}
    weights = export.quantize_int8(params)
    values, scale = weights["dense"]["kernel"]
    assert values.dtype == np.int8 and scale.shape == (1, 6)
    assert np.abs(values).max() == 127
    assert weights["dense"]["bias"] is params["dense"]["bias"] or np.array_equal(
        weights["dense"]["bias"], params["dense"]["bias"])
    restored = export.dequantize(weights)
    error = np.abs(np.asarray(restored["dense"]["kernel"]) - params["dense"]["kernel"])
    assert np.all(error <= scale / 2 + 1e-7)
    assert np.array_equal(np.asarray(restored["zero"]["kernel"]), params["zero"]["kernel"])
