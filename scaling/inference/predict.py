"""`--mode=predict`: a checkpoint's predictions for image files or a dataset split.

Inputs take the path that training and evaluation take: files are decoded to the dataset's
stored layout (uint8 pixels, nothing rescaled), and the task's own preprocessing and the
model's eval-mode forward pass (`models.forward.eval_logits`) do the rest, in batches sharded
over the mesh. Each prediction is post-processed into the argmax label and the top-k classes
with their probabilities, named by the dataset's label names, and written as JSON lines or CSV.

Only the model and its params are restored (`scaling.inference.restore`): predicting files
needs neither the dataset nor the optimizer, so it works after the data has moved. Only
`--inputs=split:NAME` loads the dataset, for that split's images.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaling.artifact.pixels import pad_batch
from scaling.artifact.postprocess import DEFAULT_TOP_K, resolve_top_k, top_k_records
from scaling.data import element_spec
from scaling.data.image_files import read_inputs
from scaling.errors import UserError
from scaling.inference import restore
from scaling.models.forward import eval_logits
from scaling.sharding import mesh as mesh_lib

IMAGE_KEY = "image"
SPLIT_PREFIX = "split:"
DEFAULT_OUTPUT = "predictions.jsonl"
OUTPUT_SUFFIXES = (".jsonl", ".csv")


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    inputs: str | None
    output: str | None = None        # default: WORKDIR/predictions.jsonl
    top_k: int | None = None         # default: DEFAULT_TOP_K; 0 means every class
    checkpoint_step: int | None = None  # default: the latest checkpoint


@dataclasses.dataclass(frozen=True)
class Inputs:
    names: list[str]
    images: np.ndarray
    targets: np.ndarray | None  # the split's labels, when the inputs are a split
    source: str


def require_classifier(config: ml_collections.ConfigDict, mode: str) -> None:
    if config.task != "classification":
        raise UserError(f"--mode={mode} needs a classification experiment; {config.experiment} "
                        f"is a {config.task} experiment (language models write text with "
                        "--mode=sample)")


def prediction_outputs(params, batch, *, model, task) -> dict[str, jax.Array]:
    """Argmax labels and class probabilities: what predict, export and serving all return."""
    logits = eval_logits(params, batch, model=model, task=task)
    return {"label": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "probabilities": jax.nn.softmax(logits, axis=-1)}


def label_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The class names of the config's dataset, known without loading it."""
    from scaling.data.images import LABEL_NAMES

    return LABEL_NAMES.get(config.data.name,
                           tuple(str(i) for i in range(config.model.get("num_classes") or 0)))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A restored checkpoint and its compiled prediction function on its mesh."""
    restored: restore.Restored
    outputs: Callable  # (params, {"image": global batch}) -> replicated prediction_outputs
    label_names: tuple[str, ...]

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.restored.config

    @property
    def params(self) -> Any:
        return self.restored.params

    @property
    def step(self) -> int:
        return self.restored.step

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) for uint8 images of any count, in eval-sized batches."""
        batch_size = self.config.eval_batch_size
        sharding = mesh_lib.batch_sharding(self.restored.mesh, self.restored.rules)
        pending = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            padded = pad_batch(chunk, batch_size)
            batch = {IMAGE_KEY: jax.make_array_from_callback(padded.shape, sharding,
                                                             padded.__getitem__)}
            pending.append((len(chunk), self.outputs(self.params, batch)))
        outputs = [(n, jax.device_get(out)) for n, out in pending]  # after all dispatches
        return (np.concatenate([out["label"][:n] for n, out in outputs]),
                np.concatenate([out["probabilities"][:n] for n, out in outputs]))


def load_predictor(config: ml_collections.ConfigDict, workdir: Path,
                   requested_step: int | None = None, experiment=None) -> Predictor:
    """Restore a checkpoint's params (the latest unless `requested_step`) and compile the
    prediction function for its mesh; the dataset and the optimizer are never touched."""
    restored = restore.load(config, workdir, requested_step, experiment)
    mesh, rules = restored.mesh, restored.rules
    restore.check_batch_divisible(config, mesh, rules)
    outputs = mesh_lib.with_mesh_rules(
        jax.jit(functools.partial(prediction_outputs, model=restored.model, task=restored.task),
                in_shardings=(restored.param_shardings,
                              {IMAGE_KEY: mesh_lib.batch_sharding(mesh, rules)}),
                out_shardings=mesh_lib.replicated(mesh)),
        mesh, rules)
    return Predictor(restored=restored, outputs=outputs, label_names=label_names(config))


def split_inputs(value: str, config: ml_collections.ConfigDict) -> Inputs:
    """A split of the dataset: the one kind of input that needs the data itself."""
    from scaling.data import load_dataset

    name = value[len(SPLIT_PREFIX):]
    try:
        dataset = load_dataset(config)
    except UserError as e:
        raise UserError(f"--inputs={value}: needs the dataset, which cannot be loaded: "
                        f"{e}") from None
    splits = {"train": dataset.train, **dataset.eval_splits}
    if name not in splits:
        raise UserError(f"--inputs={value}: unknown split {name!r}; {dataset.name} has "
                        f"{', '.join(SPLIT_PREFIX + s for s in splits)}")
    data = splits[name]
    return Inputs(names=[f"{name}[{i}]" for i in range(len(data[IMAGE_KEY]))],
                  images=data[IMAGE_KEY], targets=data["label"], source=f"split {name}")


def file_inputs(value: str, config: ml_collections.ConfigDict) -> Inputs:
    """Image files, read and checked before any heavy work starts."""
    shape = tuple(element_spec(config)[IMAGE_KEY].shape)
    names, images = read_inputs(Path(value).expanduser(), shape, f"--inputs={value}")
    return Inputs(names=names, images=images, targets=None, source=value)


def resolve_output(output: str | None, workdir: Path) -> Path:
    path = Path(output).expanduser() if output else workdir / DEFAULT_OUTPUT
    flag = f"--output={output}" if output else f"the default output {path}"
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"{flag}: expected a file name ending in "
                        f"{' or '.join(OUTPUT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise UserError(f"{flag}: the directory {path.parent} does not exist; create it or "
                        "choose another --output")
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag}: cannot write a file there; choose another --output")
    return path


def checked_top_k(top_k: int | None, num_classes: int | None) -> int:
    """The flag's value (0 means every class), checked against the config's class count."""
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    if top_k < 0:
        raise UserError(f"--top_k={top_k}: must be 0 (every class) or more")
    if num_classes:
        try:
            resolve_top_k(top_k, num_classes, "--top_k")
        except ValueError as e:
            raise UserError(str(e)) from None
    return top_k


def prediction_rows(inputs: Inputs, labels: np.ndarray, probabilities: np.ndarray,
                    top_k: int, label_names) -> list[dict]:
    records = top_k_records(labels, probabilities, top_k or probabilities.shape[-1],
                            label_names)
    rows = [{"input": name, **record} for name, record in zip(inputs.names, records,
                                                             strict=True)]
    if inputs.targets is not None:
        for row, target in zip(rows, inputs.targets, strict=True):
            row["target"] = int(target)
    return rows


def csv_row(row: dict) -> dict:
    """A JSON record flattened into columns: top1_label, top1_name, top1_probability, ..."""
    flat = {k: v for k, v in row.items() if k != "top_k"}
    for rank, entry in enumerate(row["top_k"], start=1):
        flat.update({f"top{rank}_{key}": value for key, value in entry.items()})
    return flat


def write_predictions(path: Path, rows: list[dict]) -> None:
    """JSON lines or CSV by suffix, written to a temporary file first and then renamed, so
    the output is whole or absent, never half-written."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with partial.open("w", newline="") as f:
            if path.suffix.lower() == ".csv":
                flat = [csv_row(row) for row in rows]
                writer = csv.DictWriter(f, fieldnames=list(flat[0]))
                writer.writeheader()
                writer.writerows(flat)
            else:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        partial.replace(path)
    except OSError as e:
        raise UserError(f"--output={path}: cannot write it: {e}") from None
    finally:
        partial.unlink(missing_ok=True)


def predict_to_file(config: ml_collections.ConfigDict, workdir: Path, options: PredictOptions,
                    experiment=None) -> str:
    """Everything `--mode=predict` does; returns the one-line summary to print."""
    require_classifier(config, "predict")
    if not options.inputs:
        raise UserError("--inputs is required with --mode=predict: a PNG, JPEG or NPY file, a "
                        "directory of them, or split:NAME (such as split:test)")
    output = resolve_output(options.output, workdir)
    top_k = checked_top_k(options.top_k, config.model.get("num_classes"))
    from_split = options.inputs.startswith(SPLIT_PREFIX)
    inputs = None if from_split else file_inputs(options.inputs, config)  # before heavy work
    predictor = load_predictor(config, workdir, options.checkpoint_step, experiment)
    if from_split:
        inputs = split_inputs(options.inputs, config)
    start = time.perf_counter()
    labels, probabilities = predictor.predict(inputs.images)
    seconds = time.perf_counter() - start
    rows = prediction_rows(inputs, labels, probabilities, top_k, predictor.label_names)
    if jax.process_index() == 0:
        write_predictions(output, rows)
    summary = (f"predicted {len(rows)} inputs ({inputs.source}) with the checkpoint of step "
               f"{predictor.step} in {seconds:.2f} s")
    if inputs.targets is not None:
        summary += f"; accuracy {np.mean(labels == inputs.targets):.4f} against its labels"
    return f"{summary}; wrote {output}"
