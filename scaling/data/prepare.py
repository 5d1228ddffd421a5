"""`--mode=prepare`: tokenize a text corpus once, in parallel, into shards of token ids.

For each source of `data.sources`, worker processes tokenize its units (see
`scaling.data.text_sources`) into ArrayRecord files, one per unit and split. A document is
written as [BOS] + its tokens + [EOS], documents back to back, and the stream is cut into
records of `BLOCK_TOKENS` ids, so any window of it is read with one or two record reads. A
unit's shards are renamed into place once complete and then recorded in `units/N.json`; a
prepare that is interrupted resumes from the units recorded, and `manifest.json` (per split:
shards with token and document counts; the tokenizer's fingerprint) is written last, so its
presence means the source is whole.

The tokenizer is saved beside the sources (`tokenizer/`), and training takes it from there.
A character vocabulary is collected from the corpus in a first parallel pass; a SentencePiece
model is trained on a sample of the corpus when `data.tokenizer_model` names none.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from scaling.data import text_sources
from scaling.data.text_sources import Malformed, SourceSpec, Unit
from scaling.data.tokenizer import (
    TOKENIZER_DIR,
    Tokenizer,
    fingerprint,
    load_tokenizer,
    make_tokenizer,
    matches_config,
    save_tokenizer,
)
from scaling.errors import UserError

FORMAT = 1
BLOCK_TOKENS = 16_384
MANIFEST = "manifest.json"
UNITS_DIR = "units"
SENTENCEPIECE_SAMPLE_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """The `data` fields a worker needs, as plain values it can be sent."""
    manual_dir: str
    tfds_data_dir: str
    text_field: str
    validation_fraction: float
    on_malformed: str

    @classmethod
    def of(cls, data_config) -> ReadOptions:
        return cls(data_config.manual_dir, data_config.tfds_data_dir, data_config.text_field,
                   float(data_config.validation_fraction), data_config.on_malformed)


def corpus_root(config) -> Path:
    """Where the experiment's prepared corpus lives: `data.prepared_dir`, else a folder named
    after the experiment under $SCALING_DATA_DIR (default ~/.cache/scaling/corpora)."""
    if config.data.prepared_dir:
        return Path(config.data.prepared_dir).expanduser()
    base = os.environ.get("SCALING_DATA_DIR") or Path.home() / ".cache" / "scaling" / "corpora"
    return Path(base) / (config.experiment or "corpus")


def source_specs(data_config) -> list[SourceSpec]:
    if data_config.name == "tiny_shakespeare":
        return text_sources.parse_sources(("tiny_shakespeare",))
    return text_sources.parse_sources(tuple(data_config.sources))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# --- what runs in the worker processes -------------------------------------------------------

_worker: dict = {}


def _init_worker(saved_tokenizer_dir: str | None) -> None:
    if saved_tokenizer_dir is not None:
        _worker["tokenizer"] = load_tokenizer(Path(saved_tokenizer_dir))


def _unit_characters(job: tuple[SourceSpec, Unit, ReadOptions]) -> tuple[set[str], int]:
    spec, unit, options = job
    malformed = Malformed(options.on_malformed)
    chars: set[str] = set()
    for _, text in text_sources.documents(spec, unit, options, malformed):
        chars.update(text)
    return chars, unit.bytes


def _tokenize_unit(job: tuple[SourceSpec, Unit, ReadOptions, str]) -> dict:
    """Write one unit's shards (one per split it has documents of); return its record."""
    spec, unit, options, directory = job
    tokenizer: Tokenizer = _worker["tokenizer"]
    dtype = token_dtype(tokenizer.vocab_size)
    malformed = Malformed(options.on_malformed)
    writers: dict[str, _ShardWriter] = {}
    try:
        for split, text in text_sources.documents(spec, unit, options, malformed):
            if split not in writers:
                writers[split] = _ShardWriter(Path(directory), split, unit.index, dtype)
            ids = tokenizer.encode(text)
            parts = ([[tokenizer.bos_id]] if tokenizer.bos_id is not None else []) + \
                [ids, [tokenizer.eos_id]]
            writers[split].add(np.concatenate(parts).astype(dtype))
        shards = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.abandon()
    return {"unit": unit.index, "shards": shards, "bytes": unit.bytes,
            "malformed": malformed.count, "first_malformed": malformed.first}


class _ShardWriter:
    """Documents of one split into fixed-size records, staged under a temporary name."""

    def __init__(self, directory: Path, split: str, unit: int, dtype: np.dtype):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.name = f"{split}-{unit:05d}.array_record"
        self.final = directory / self.name
        self.partial = directory / f".{self.name}.tmp-{os.getpid()}"
        self.writer = ArrayRecordWriter(str(self.partial), "group_size:1,uncompressed")
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.tokens = self.documents = self.records = 0
        self.done = False

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self.pending_tokens >= BLOCK_TOKENS:
            stream = np.concatenate(self.pending)
            whole = len(stream) // BLOCK_TOKENS * BLOCK_TOKENS
            for start in range(0, whole, BLOCK_TOKENS):
                self._write(stream[start:start + BLOCK_TOKENS])
            self.pending = [stream[whole:]]
            self.pending_tokens = len(stream) - whole

    def _write(self, block: np.ndarray) -> None:
        self.writer.write(block.tobytes())
        self.records += 1

    def finish(self) -> dict:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.writer.close()
        self.partial.replace(self.final)
        self.done = True
        return {"file": self.name, "tokens": self.tokens, "documents": self.documents,
                "records": self.records}

    def abandon(self) -> None:
        if not self.done:
            self.writer.close()
            self.partial.unlink(missing_ok=True)


# --- the parent process --------------------------------------------------------------------

def _write_json(path: Path, value) -> None:
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    partial.replace(path)


class _Progress:
    """One line per second at most: units done, megabytes, rate and the time left."""

    def __init__(self, label: str, total_bytes: int, out=None):
        self.label, self.total, self.out = label, max(total_bytes, 1), out or sys.stderr
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, units_done: int, units: int, nbytes: int, final: bool = False) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if not final and now - self.last < 1.0:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        print(f"prepare {self.label}: {units_done}/{units} units, {self.done / 1e6:.1f} of "
              f"{self.total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, ETA {eta:.0f} s",
              file=self.out, flush=True)


def _run_jobs(function: Callable, jobs: list, workers: int, initargs: tuple,
              on_result: Callable) -> None:
    """`function` over `jobs` in `workers` processes (in this one for a single worker)."""
    if workers <= 1 or len(jobs) <= 1:
        _init_worker(*initargs)
        for job in jobs:
            on_result(function(job))
        return
    context = multiprocessing.get_context("spawn")  # no forking of a threaded parent
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker,
                      initargs=initargs) as pool:
        for result in pool.imap_unordered(function, jobs):
            on_result(result)


def _make_tokenizer(config, specs: list[SourceSpec], units: dict[str, list[Unit]],
                    options: ReadOptions, root: Path) -> Tokenizer:
    """The tokenizer the corpus is prepared with, built (or trained) and saved in `root`."""
    data = config.data
    if data.tokenizer == "char":
        chars: set[str] = set()
        jobs = [(spec, unit, options) for spec in specs for unit in units[spec.slug]]
        progress = _Progress("characters", sum(u.bytes for _, u, _ in jobs))
        done = [0]

        def collect(result):
            chars.update(result[0])
            done[0] += 1
            progress.advance(done[0], len(jobs), result[1], final=done[0] == len(jobs))

        _run_jobs(_unit_characters, jobs, data.prepare_workers, (None,), collect)
        tokenizer = make_tokenizer("char", "".join(chars))
    elif data.tokenizer == "sentencepiece" and not data.tokenizer_model:
        tokenizer = _train_sentencepiece(config, specs, units, options, root)
    else:
        tokenizer = make_tokenizer(data.tokenizer, "", data.tokenizer_model)
    save_tokenizer(tokenizer, root / TOKENIZER_DIR)
    return load_tokenizer(root / TOKENIZER_DIR)


def _sample_lines(specs, units, options: ReadOptions, limit: int) -> Iterable[str]:
    """Lines of the first documents of every source's units, about `limit` characters in all,
    shared evenly between the sources."""
    per_source = limit // len(specs)
    for spec in specs:
        source_taken = 0
        for unit in units[spec.slug]:
            for _, text in text_sources.documents(spec, unit, options, Malformed("skip")):
                for line in text.splitlines():
                    if line.strip():
                        yield line[:4000]
                        source_taken += len(line)
                if source_taken >= per_source:
                    break
            if source_taken >= per_source:
                break


def _train_sentencepiece(config, specs, units, options: ReadOptions, root: Path) -> Tokenizer:
    import sentencepiece


    directory = root / "sentencepiece"
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "model"
    print(f"prepare: training a SentencePiece model of {config.data.sentencepiece_vocab_size} "
          "pieces on a sample of the corpus", file=sys.stderr, flush=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_sample_lines(specs, units, options,
                                                 SENTENCEPIECE_SAMPLE_BYTES)),
            model_prefix=str(prefix), vocab_size=config.data.sentencepiece_vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            num_threads=max(1, config.data.prepare_workers), bos_id=-1, eos_id=1, unk_id=0,
            pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"--config.data.sentencepiece_vocab_size="
                        f"{config.data.sentencepiece_vocab_size}: SentencePiece could not "
                        f"train on this corpus ({str(e).splitlines()[-1]})") from None
    return make_tokenizer("sentencepiece", "", f"{prefix}.model")


def prepare(config, out=None) -> dict[str, dict]:
    """Prepare every source of the config's corpus; return each source's manifest."""
    out = out or sys.stderr
    data = config.data
    root = corpus_root(config)
    specs = source_specs(data)
    options = ReadOptions.of(data)
    units = {spec.slug: text_sources.make_units(spec, options) for spec in specs}
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--config.data.prepared_dir={root}: cannot write there "
                        f"({e.strerror})") from None
    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    if tokenizer is not None and not matches_config(tokenizer, data):
        raise UserError(f"--config.data.prepared_dir={root}: holds shards prepared with another "
                        f"tokenizer ({tokenizer.saved_form()[0]['kind']}, "
                        f"{fingerprint(tokenizer)}); choose another --config.data.prepared_dir, "
                        "or delete that folder to prepare anew")
    if tokenizer is None:
        tokenizer = _make_tokenizer(config, specs, units, options, root)
    manifests = {}
    for spec in specs:
        manifests[spec.slug] = _prepare_source(spec, units[spec.slug], tokenizer, options,
                                               root, data.prepare_workers, out)
    return manifests


def _prepare_source(spec: SourceSpec, units: list[Unit], tokenizer: Tokenizer,
                    options: ReadOptions, root: Path, workers: int, out) -> dict:
    directory = root / spec.slug
    manifest_path = directory / MANIFEST
    print_ = lambda text: print(text, file=out, flush=True)  # noqa: E731
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        print_(f"prepare {spec.text}: already prepared in {directory}")
        return manifest
    remove_staged_shards(directory)
    (directory / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    print_fp = fingerprint(tokenizer)
    records: dict[int, dict] = {}
    for unit in units:
        path = directory / UNITS_DIR / f"{unit.index:05d}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("tokenizer") != print_fp:
                raise UserError(f"{path}: this unit was prepared with another tokenizer; "
                                f"delete {directory} to prepare the source anew")
            records[unit.index] = record
    todo = [unit for unit in units if unit.index not in records]
    if records:
        print_(f"prepare {spec.text}: resuming; {len(records)} of {len(units)} units done")
    progress = _Progress(spec.text, sum(u.bytes for u in todo), out)

    def finished(record: dict) -> None:
        record["tokenizer"] = print_fp
        _write_json(directory / UNITS_DIR / f"{record['unit']:05d}.json", record)
        records[record["unit"]] = record
        progress.advance(len(records), len(units), record["bytes"],
                         final=len(records) == len(units))

    jobs = [(spec, unit, options, str(directory)) for unit in todo]
    _run_jobs(_tokenize_unit, jobs, workers, (str(root / TOKENIZER_DIR),), finished)
    manifest = _manifest(spec, units, records, tokenizer)
    _write_json(manifest_path, manifest)
    skipped = manifest["malformed"]
    print_(f"prepare {spec.text}: " + ", ".join(
        f"{split} {info['tokens']:,} tokens in {info['documents']:,} documents"
        for split, info in manifest["splits"].items())
        + (f"; {skipped} malformed records skipped (first: {manifest['first_malformed']})"
           if skipped else ""))
    return manifest


def _manifest(spec: SourceSpec, units: list[Unit], records: dict[int, dict],
              tokenizer: Tokenizer) -> dict:
    splits: dict[str, dict] = {}
    for unit in units:
        for split, shard in records[unit.index]["shards"].items():
            entry = splits.setdefault(split, {"shards": [], "tokens": 0, "documents": 0})
            entry["shards"].append(shard)
            entry["tokens"] += shard["tokens"]
            entry["documents"] += shard["documents"]
    order = ("train", "validation", "test")
    splits = dict(sorted(splits.items(), key=lambda kv: (order + (kv[0],)).index(kv[0])))
    if not splits.get("train", {}).get("tokens"):
        raise UserError(f"--config.data.sources: {spec.text!r} has no training text")
    malformed = [records[u.index] for u in units if records[u.index]["malformed"]]
    return {
        "format": FORMAT, "source": spec.text, "kind": spec.kind,
        "tokenizer": {"fingerprint": fingerprint(tokenizer),
                      "kind": tokenizer.saved_form()[0]["kind"],
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "bos_id": tokenizer.bos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name, "block_tokens": BLOCK_TOKENS,
        "bytes": sum(u.bytes for u in units), "splits": splits,
        "malformed": sum(r["malformed"] for r in malformed),
        "first_malformed": malformed[0]["first_malformed"] if malformed else "",
    }


def remove_staged_shards(directory: Path) -> None:
    """Staged shards a killed worker left behind; they are never read, only tidied."""
    for path in Path(directory).glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
