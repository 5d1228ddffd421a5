"""Supervised fine-tuning data: prompt/response pairs packed into windows with loss weights.

Each pair becomes one document, [BOS] prompt response EOS, and the loss counts only the
response and its EOS (`weights`, aligned with the targets), so the model learns to answer
and never to write prompts. Pairs are packed whole, in order, into windows of seq_len + 1
tokens with `segment_ids` and `positions` (the packing of `scaling.data.packed_windows`), so
no attention crosses from one pair into another; a pair longer than a window keeps its first
seq_len + 1 tokens and is counted in a note.

`data.sft_source` is `jsonl:GLOB` (JSON Lines whose `data.prompt_field` and
`data.response_field` hold the pair; a pair goes to validation by a hash of its prompt, so
repeated prompts never straddle the splits) or `synthetic:add` / `synthetic:reverse`, tasks
generated from the seed for experiments that must run offline. SFT sets are small next to a
pre-training corpus, so they are tokenized at load, in memory.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import numpy as np

from scaling.data.dataset import ArrayDataset
from scaling.data.text_sources import in_validation
from scaling.data.tokenizer import make_tokenizer
from scaling.errors import UserError

KINDS = ("jsonl", "synthetic")
SYNTHETIC_TASKS = ("add", "reverse")


def _synthetic_pairs(task: str, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` deterministic pairs: sums of two numbers below 1000, or strings of 3 to 8
    lowercase letters reversed."""
    rng = np.random.default_rng([seed, SYNTHETIC_TASKS.index(task)])
    pairs = []
    for _ in range(count):
        if task == "add":
            a, b = (int(x) for x in rng.integers(0, 1000, 2))
            pairs.append((f"{a}+{b}=", str(a + b)))
        else:
            word = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(3, 9)))
            pairs.append((f"reverse {word}:", word[::-1]))
    return pairs


def _jsonl_pairs(pattern: str, data_config) -> list[tuple[str, str]]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise UserError(f"--config.data.sft_source=jsonl:{pattern}: matches no file")
    fields = (data_config.prompt_field, data_config.response_field)
    pairs, skipped = [], 0
    for name in files:
        try:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{name}: cannot read it as UTF-8 text ({e})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pair = tuple(record[f] for f in fields)
                if not all(isinstance(v, str) for v in pair):
                    raise TypeError("not strings")
            except (ValueError, KeyError, TypeError) as e:
                if data_config.on_malformed == "skip":
                    skipped += 1
                    continue
                raise UserError(f"{name}:{number}: not a JSON object with string fields "
                                f"{' and '.join(fields)} ({type(e).__name__}: {e}); fix it, or "
                                "pass --config.data.on_malformed=skip") from None
            pairs.append(pair)
    if skipped:
        print(f"note: skipped {skipped} malformed lines of {pattern}", file=sys.stderr)
    return pairs


def read_pairs(config) -> dict[str, list[tuple[str, str]]]:
    """{"train": pairs, "validation": pairs} of `data.sft_source`."""
    data = config.data
    kind, _, argument = data.sft_source.partition(":")
    if kind == "synthetic":
        if argument not in SYNTHETIC_TASKS:
            raise UserError(f"--config.data.sft_source={data.sft_source}: synthetic tasks are "
                            f"{', '.join(SYNTHETIC_TASKS)}")
        pairs = _synthetic_pairs(argument, data.synthetic_examples, config.seed)
    elif kind == "jsonl" and argument:
        pairs = _jsonl_pairs(argument, data)
    else:
        raise UserError(f"--config.data.sft_source={data.sft_source!r}: expected jsonl:GLOB "
                        f"or synthetic:{'|'.join(SYNTHETIC_TASKS)}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for prompt, response in pairs:
        split = "validation" if in_validation(prompt, data.validation_fraction) else "train"
        splits[split].append((prompt, response))
    for split, found in splits.items():
        if not found:
            raise UserError(f"--config.data.sft_source={data.sft_source}: no pair falls in "
                            f"the {split} split (of {len(pairs)}); add pairs or change "
                            "--config.data.validation_fraction")
    return splits


def pack(pairs: list[tuple[str, str]], tokenizer, seq_len: int) -> tuple[dict, int]:
    """Windows (tokens, segment_ids, positions of seq_len + 1; weights of seq_len targets)
    holding whole pairs in order, and how many pairs were cut to fit a window."""
    window = seq_len + 1
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used, cut = 0, 0
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for prompt, response in pairs:
        head = np.asarray(bos + list(tokenizer.encode(prompt)), np.int32)
        tail = np.asarray(list(tokenizer.encode(response)) + [tokenizer.eos_id], np.int32)
        tokens = np.concatenate([head, tail])
        answer = np.concatenate([np.zeros(len(head), bool), np.ones(len(tail), bool)])
        if len(tokens) > window:
            tokens, answer, cut = tokens[:window], answer[:window], cut + 1
        if used + len(tokens) > window:
            rows.append([])
            used = 0
        rows[-1].append((tokens, answer))
        used += len(tokens)
    out = {"tokens": np.zeros((len(rows), window), np.int32),
           "segment_ids": np.zeros((len(rows), window), np.int32),
           "positions": np.zeros((len(rows), window), np.int32),
           "weights": np.zeros((len(rows), seq_len), np.float32)}
    for r, row in enumerate(rows):
        at = 0
        for segment, (tokens, answer) in enumerate(row, 1):
            span = slice(at, at + len(tokens))
            out["tokens"][r, span] = tokens
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(tokens))
            # Target t is token t + 1: weighted when that token is part of the answer.
            targets = np.zeros(window, bool)
            targets[span] = answer
            out["weights"][r] += targets[1:]
            at += len(tokens)
    return out, cut


def load_sft_dataset(config) -> ArrayDataset:
    data = config.data
    splits = read_pairs(config)
    corpus = "".join(p + r for pairs in splits.values() for p, r in pairs)
    tokenizer = make_tokenizer(data.tokenizer, corpus, data.tokenizer_model)
    packed, cuts = {}, 0
    for split, pairs in splits.items():
        packed[split], cut = pack(pairs, tokenizer, data.seq_len)
        cuts += cut
    if cuts:
        print(f"note: {cuts} pairs are longer than --config.data.seq_len={data.seq_len} + 1 "
              "tokens and were cut to fit", file=sys.stderr)
    sizes = {split: len(pairs) for split, pairs in splits.items()}
    return ArrayDataset(
        name=data.name, train=packed["train"], eval_splits={"validation": packed["validation"]},
        label_names=(), tokenizer=tokenizer,
        source=(f"{data.sft_source} ({sizes['train']} train pairs in "
                f"{len(packed['train']['tokens'])} windows, {sizes['validation']} validation)"))
