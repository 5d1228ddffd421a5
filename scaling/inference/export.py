"""`--mode=export`: a checkpoint as a `jax.export` artifact that runs without the framework.

The exported function is `predict.prediction_outputs` itself, preprocessing included, traced
once with a symbolic batch dimension and lowered to StableHLO for CPU, CUDA and TPU; the
directory layout is described in `scaling.artifact.loader`, which reads it. Optionally the
weight matrices are stored as int8 with one float scale per output unit (weight-only,
symmetric), dequantized inside the function; activations stay in float. Every export is
loaded back through that loader and compared with the checkpoint before it replaces anything,
so the reported accuracy is the artifact's own.

Export restores the params only (`scaling.inference.restore`) and never loads the dataset:
the comparison runs on the held-out sample of each eval split that training saved in the
workdir (`scaling.data.heldout`: up to 1000 examples, the whole split when smaller). The same
sample every time makes exports of one run comparable, and the check still runs once the data
has moved; a workdir trained before samples were saved exports with the check skipped, and
says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax import export as jax_export

from scaling import artifact
from scaling.artifact.loader import (
    FORMAT,
    FUNCTION_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    ServedModel,
)
from scaling.data import element_spec, heldout
from scaling.errors import UserError
from scaling.inference.predict import (
    IMAGE_KEY,
    Predictor,
    load_predictor,
    prediction_outputs,
    require_classifier,
)

PLATFORMS = ("cpu", "cuda", "tpu")
QUANTIZATIONS = ("int8",)
DEFAULT_DIRECTORY = "export"
PREPROCESSING = ("raw pixels exactly as the dataset stores them (uint8, height x width x "
                 "channels); the artifact scales them to [0, 1] itself, as training did")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    artifact: str | None = None         # default: WORKDIR/export
    quantize: str | None = None         # None or "int8"
    checkpoint_step: int | None = None  # default: the latest checkpoint


def quantize_int8(params):
    """Each float weight matrix as (int8 values, float scale per output unit); the rest as is.

    The scale maps the largest magnitude in each output column to 127, so rounding costs at
    most half a step, 1/254 of that column's range.
    """
    def quantize(w):
        w = np.asarray(w)
        if w.ndim < 2 or not np.issubdtype(w.dtype, np.floating):
            return w
        scale = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / 127
        scale = np.where(scale > 0, scale, 1).astype(w.dtype)
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale
    return jax.tree_util.tree_map(quantize, params)


def dequantize(weights):
    """The inverse of `quantize_int8` inside the exported function; float weights pass through."""
    def restore(w):
        return w[0].astype(w[1].dtype) * w[1] if isinstance(w, tuple) else w
    return jax.tree_util.tree_map(restore, weights, is_leaf=lambda w: isinstance(w, tuple))


def export_function(predictor: Predictor, weights) -> jax_export.Exported:
    """(weights, images) -> {"label", "probabilities"}, for any batch size."""
    model, task = predictor.restored.model, predictor.restored.task

    def serve(weights, images):
        return prediction_outputs(dequantize(weights), {IMAGE_KEY: images}, model=model,
                                  task=task)

    spec = element_spec(predictor.config)[IMAGE_KEY]
    (batch,) = jax_export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *spec.shape), spec.dtype)
    weight_specs = jax.tree_util.tree_map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype),
                                          weights)
    return jax_export.export(jax.jit(serve), platforms=PLATFORMS)(weight_specs, images)


def check_destination(artifact: str | None, workdir: Path) -> Path:
    """The artifact directory, refused before any work if it holds something else."""
    path = Path(artifact).expanduser() if artifact else workdir / DEFAULT_DIRECTORY
    flag = f"--artifact={artifact}" if artifact else f"the default artifact directory {path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}: a file is in the way; choose a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / METADATA_FILE).is_file():
        raise UserError(f"{flag}: the directory holds files that are not an exported model; "
                        "choose an empty or new directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create its parent directory ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag}: cannot write in {path.parent}; choose another --artifact")
    return path


def metadata_for(predictor: Predictor, exported: jax_export.Exported, weights,
                 quantize: str | None) -> dict:
    config = predictor.config
    spec = element_spec(config)[IMAGE_KEY]
    stored = jax.tree_util.tree_leaves(weights)
    float_bytes = sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(predictor.params))
    return {
        "format": FORMAT,
        "experiment": config.experiment,
        "checkpoint_step": predictor.step,
        "task": config.task,
        "input": {"name": IMAGE_KEY, "shape": list(spec.shape), "dtype": str(spec.dtype),
                  "batch_dimension": "symbolic"},
        "preprocessing": PREPROCESSING,
        "outputs": {"label": "int32 argmax class per example",
                    "probabilities": "float32 softmax over the classes per example"},
        "label_names": list(predictor.label_names),
        "num_classes": int(exported.out_avals[-1].shape[-1]),
        "batch_size": int(config.eval_batch_size),
        "platforms": list(exported.platforms),
        "quantization": None if quantize is None else {
            "method": "int8 weight-only, symmetric, one scale per output unit",
            "quantized_arrays": sum(isinstance(w, tuple) for w in jax.tree_util.tree_leaves(
                weights, is_leaf=lambda w: isinstance(w, tuple)))},
        "weights": {"arrays": len(stored), "bytes": int(sum(w.nbytes for w in stored)),
                    "float_bytes": int(float_bytes)},
        "jax_version": jax.__version__,
    }


def write_files(directory: Path, exported: jax_export.Exported, weights, metadata: dict) -> None:
    directory.mkdir()
    (directory / FUNCTION_FILE).write_bytes(exported.serialize())
    leaves = jax.tree_util.tree_leaves(weights)
    np.savez(directory / WEIGHTS_FILE, **{f"{i:05d}": w for i, w in enumerate(leaves)})
    write_metadata(directory, metadata)


def write_metadata(directory: Path, metadata: dict) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def compare_on_samples(predictor: Predictor, model: ServedModel,
                       samples: dict[str, dict[str, np.ndarray]]) -> dict:
    """Accuracy of the checkpoint and of the loaded artifact on each split's held-out sample,
    and how often they agree."""
    results = {}
    for split, data in samples.items():
        reference, _ = predictor.predict(data[IMAGE_KEY])
        labels, _ = model.predict_arrays(data[IMAGE_KEY])
        results[split] = {"checkpoint": float(np.mean(reference == data["label"])),
                          "artifact": float(np.mean(labels == data["label"])),
                          "agreement": float(np.mean(labels == reference)),
                          "examples": int(len(data["label"])),
                          "split_size": int(data["split_size"])}
    return results


def publish(staging: Path, destination: Path) -> None:
    """Swap the finished staging directory in; a previous export is replaced only now."""
    if not destination.exists():
        staging.rename(destination)
        return
    previous = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    destination.rename(previous)
    staging.rename(destination)
    shutil.rmtree(previous)


def export_checkpoint(config: ml_collections.ConfigDict, workdir: Path, options: ExportOptions,
                      experiment=None) -> str:
    """Everything `--mode=export` does; returns the report to print."""
    require_classifier(config, "export")
    if options.quantize and options.quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize={options.quantize}: expected {' or '.join(QUANTIZATIONS)}, "
                        "or leave it unset for float weights")
    if jax.process_count() > 1:
        raise UserError("--mode=export runs in one process; start it without "
                        "--num_processes (every checkpoint restores on any device count)")
    destination = check_destination(options.artifact, workdir)
    samples = heldout.load_sample(workdir)
    predictor = load_predictor(config, workdir, options.checkpoint_step, experiment)
    params = jax.device_get(predictor.params)
    quantize = options.quantize or None
    weights = quantize_int8(params) if quantize == "int8" else params
    exported = export_function(predictor, weights)
    metadata = metadata_for(predictor, exported, weights, quantize)

    staging = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_files(staging, exported, weights, metadata)
        metadata["accuracy"] = (None if samples is None else
                                compare_on_samples(predictor, artifact.load(staging), samples))
        write_metadata(staging, metadata)
        publish(staging, destination)
    except OSError as e:
        raise UserError(f"--artifact={destination}: cannot write the export: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_report(destination, metadata)


def export_report(destination: Path, metadata: dict) -> str:
    weights = metadata["weights"]
    kind = "int8 weight matrices" if metadata["quantization"] else "float weights"
    lines = [f"exported step {metadata['checkpoint_step']} of {metadata['experiment']} to "
             f"{destination} for {', '.join(metadata['platforms'])}, batch size symbolic; "
             f"{kind}: {weights['bytes'] / 1024:.0f} KiB ({weights['float_bytes'] / 1024:.0f} "
             "KiB in float)"]
    if metadata["accuracy"] is None:
        lines.append(f"accuracy check skipped: the workdir holds no held-out sample "
                     f"({heldout.FILE_NAME}, saved when training starts); re-run training "
                     "with the data available to save one")
    for split, values in (metadata["accuracy"] or {}).items():
        change = values["artifact"] - values["checkpoint"]
        lines.append(f"{split} accuracy: checkpoint {values['checkpoint']:.4f}, artifact "
                     f"{values['artifact']:.4f} (change {change:+.4f}); "
                     f"{values['agreement']:.2%} of labels agree; on the held-out sample of "
                     f"{values['examples']} of its {values['split_size']} examples")
    return "\n".join(lines)
