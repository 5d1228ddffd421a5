"""How a task's batch becomes the model's inputs: shared by training, evaluation, prediction,
export and sampling, so every mode feeds the model exactly as training did.

A language-modelling batch holds `tokens` (B, L+1), inputs and targets in one window, and
optionally, aligned with it, `segment_ids` (the document of each token within the window,
1, 2, ...; 0 for padding) and `positions` (each token's position within its document) when
the window packs several documents. The model then sees them for the inputs.

The losses and eval sums of each task are training's (`scaling.training.tasks`). Nothing
here imports JAX: the functions slice and cast whatever arrays they are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from scaling.errors import UserError


def _no_model_inputs(batch: dict) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A task's model inputs, by task name."""
    name: str
    preprocess: Callable      # batch -> the model's input
    # batch -> keyword arguments of the model beside the preprocessed input; whatever a
    # batch carries that the model needs but a plain input cannot hold (packed documents).
    model_inputs: Callable[[dict], dict] = _no_model_inputs


def _scale_pixels(batch):
    return batch["image"].astype(np.float32) / 255.0


def _next_token_inputs(batch):
    return batch["tokens"][:, :-1]


# Batch keys of packed windows, and the model's keyword arguments that take them.
PACKING_INPUTS = {"segment_ids": "segment_ids_BL", "positions": "positions_BL"}


def _next_token_model_inputs(batch: dict) -> dict:
    """The documents and in-document positions of the inputs, when the window packs several;
    nothing otherwise, so unpacked batches run the model exactly as before."""
    return {arg: batch[key][:, :-1] for key, arg in PACKING_INPUTS.items() if key in batch}


CLASSIFICATION = Preprocessing("classification", _scale_pixels)
LANGUAGE_MODELING = Preprocessing("language_modeling", _next_token_inputs,
                                  _next_token_model_inputs)
SUPERVISED_FINETUNING = dataclasses.replace(LANGUAGE_MODELING, name="sft")

PREPROCESSING = {p.name: p for p in (CLASSIFICATION, LANGUAGE_MODELING, SUPERVISED_FINETUNING)}
LANGUAGE_TASKS = ("language_modeling", "sft")  # sampled from, with a tokenizer


def get_preprocessing(name: str) -> Preprocessing:
    if name not in PREPROCESSING:
        raise UserError(f"--config.task={name}: expected one of {', '.join(PREPROCESSING)}")
    return PREPROCESSING[name]
