"""Where documents come from: the `data.sources` of a text corpus, read one unit at a time.

A source is written `KIND:ARGUMENT`, optionally followed by `@WEIGHT` for a mixture:

- `text:GLOB`: plain UTF-8 text files, one document per file;
- `jsonl:GLOB`: JSON Lines, one document per line, its text in `data.text_field`;
- `parquet:GLOB`: Parquet files, one document per row of the column `data.text_field`;
- `tfds:NAME`: a TFDS dataset prepared in the ArrayRecord format (local or gs://, at
  `data.tfds_data_dir`), read through its random-access data source, feature `text_field`;
- `tiny_shakespeare`: TFDS's source file `input.txt` (from `data.manual_dir`), split 90/5/5
  into train, validation and test exactly as the TFDS builder splits it.

File sources have no splits of their own: each document goes to `validation` when a hash of
its text falls below `data.validation_fraction`, so the split depends on the text alone, not
on file order, paths or the number of workers. Work is cut into units (a group of files, a
range of records) that a worker tokenizes into one shard per split; units are deterministic,
so an interrupted prepare resumes unit by unit.

Malformed input (a line that is not JSON, a record without the text field, bytes that are
not UTF-8) is refused with the file and line named, or counted and skipped when
`data.on_malformed=skip`; it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from scaling.errors import UserError

KINDS = ("text", "jsonl", "parquet", "tfds", "tiny_shakespeare")
FILE_KINDS = ("text", "jsonl", "parquet")
# Files are grouped into units of about a 64th of the source (so that workers share even a
# small corpus), between these bounds; a function of the files alone, so a resumed prepare
# finds the same units whatever its number of workers.
UNIT_BYTES = 32 * 2**20
MIN_UNIT_BYTES = 256 * 2**10
MAX_TFDS_UNIT_RECORDS = 200_000
SHAKESPEARE_FILE = "input.txt"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    argument: str
    weight: float
    text: str  # as the user wrote it, for messages and the manifest

    @property
    def slug(self) -> str:
        """A folder name for this source's prepared shards: readable, and unique per spec."""
        readable = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.kind}-{self.argument}").strip("-")
        digest = hashlib.sha256(f"{self.kind}:{self.argument}".encode()).hexdigest()[:8]
        return f"{readable[:40]}-{digest}"


def parse_sources(sources: tuple[str, ...]) -> list[SourceSpec]:
    """`data.sources` as specs, each checked for its kind and weight."""
    if not sources:
        raise UserError("--config.data.sources: empty; name at least one source, e.g. "
                        "text:/path/to/*.txt")
    specs = []
    for text in sources:
        body, _, weight_text = str(text).partition("@")
        kind, _, argument = body.partition(":")
        if kind not in KINDS:
            raise UserError(f"--config.data.sources: {text!r} has no known kind; write "
                            f"KIND:ARGUMENT[@WEIGHT] with KIND one of {', '.join(KINDS)}")
        if kind != "tiny_shakespeare" and not argument:
            raise UserError(f"--config.data.sources: {text!r} names no "
                            f"{'dataset' if kind == 'tfds' else 'files'} after '{kind}:'")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = -1.0
        if not weight > 0:
            raise UserError(f"--config.data.sources: {text!r}: the weight after @ must be a "
                            "positive number")
        specs.append(SourceSpec(kind, argument, weight, str(text)))
    if len({s.slug for s in specs}) != len(specs):
        raise UserError("--config.data.sources: a source is named twice")
    return specs


@dataclasses.dataclass(frozen=True)
class Unit:
    """One worker's share of a source: files, or a record range of one TFDS split."""
    index: int
    files: tuple[str, ...] = ()
    split: str = ""            # TFDS and tiny Shakespeare units come from one split
    start: int = 0
    stop: int = 0
    bytes: int = 0


def expand_glob(spec: SourceSpec) -> list[Path]:
    pattern = str(Path(spec.argument).expanduser())
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise UserError(f"--config.data.sources: {spec.text!r} matches no file; check the "
                        "path (use ** for subfolders)")
    return paths


def make_units(spec: SourceSpec, data_config) -> list[Unit]:
    """The source's units of work, in a fixed order."""
    if spec.kind in FILE_KINDS:
        paths = expand_glob(spec)
        sizes = [p.stat().st_size for p in paths]
        if sum(sizes) == 0:
            raise UserError(f"--config.data.sources: {spec.text!r}: every matching file is "
                            "empty")
        unit_bytes = min(UNIT_BYTES, max(MIN_UNIT_BYTES, sum(sizes) // 64))
        units, group, group_bytes = [], [], 0
        for path, size in zip(paths, sizes, strict=True):
            group.append(str(path))
            group_bytes += size
            if group_bytes >= unit_bytes:
                units.append(Unit(len(units), tuple(group), bytes=group_bytes))
                group, group_bytes = [], 0
        if group:
            units.append(Unit(len(units), tuple(group), bytes=group_bytes))
        return units
    if spec.kind == "tiny_shakespeare":
        files = _shakespeare_files(data_config)
        size = Path(files[0]).stat().st_size // 3 if files else 0
        return [Unit(i, files, split=split, bytes=size)
                for i, split in enumerate(("train", "validation", "test"))]
    units = []
    for split, size in _tfds_split_sizes(spec.argument, data_config).items():
        for start in range(0, size, MAX_TFDS_UNIT_RECORDS):
            units.append(Unit(len(units), split=split, start=start,
                              stop=min(size, start + MAX_TFDS_UNIT_RECORDS)))
    return units


def _shakespeare_files(data_config) -> tuple[str, ...]:
    """TFDS's source file from `manual_dir`; or () when TFDS itself will read the dataset
    (TensorFlow installed, and the dataset prepared or its host reachable)."""
    if data_config.manual_dir:
        path = Path(data_config.manual_dir).expanduser() / SHAKESPEARE_FILE
        if not path.is_file():
            raise UserError(f"--config.data.manual_dir={data_config.manual_dir}: expected the "
                            f"file {SHAKESPEARE_FILE}")
        return (str(path),)
    from scaling.data import tfds_source

    name = "tiny_shakespeare"
    if tfds_source.tensorflow_available() and (
            tfds_source.tfds_is_prepared(name, data_config.tfds_data_dir)
            or tfds_source.network_reachable(*tfds_source.DOWNLOAD_HOSTS[name])):
        return ()
    raise UserError(
        f"dataset {name} is not available: TFDS needs TensorFlow and the network to prepare "
        f"it. Options: set --config.data.manual_dir to a directory holding TFDS's source "
        f"file {SHAKESPEARE_FILE}; or set --config.data.tfds_data_dir to a TFDS data directory "
        "and install TensorFlow (pip install 'scaling[tfds]') with network access.")


def _shakespeare_from_tfds(split: str, data_config) -> str:
    import tensorflow_datasets as tfds

    builder = tfds.builder("tiny_shakespeare", data_dir=data_config.tfds_data_dir or None)
    builder.download_and_prepare()
    texts = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["text"]
    return "".join(t.decode("utf-8") for t in texts)


def split_like_tfds(text: str) -> dict[str, str]:
    """The TFDS tiny_shakespeare split: the first 90% trains, the rest halves into val/test."""
    cut = int(len(text) * 0.9)
    train, rest = text[:cut], text[cut:]
    half = int(len(rest) * 0.5)
    return {"train": train, "validation": rest[:half], "test": rest[half:]}


def _tfds_data_source(name: str, split: str, data_config):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(f"--config.data.sources: tfds:{name} needs tensorflow-datasets: "
                        "pip install tensorflow-datasets") from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_config.tfds_data_dir or None,
                                download=False)
    except Exception as e:  # TFDS raises many kinds for a dataset it cannot find
        raise UserError(
            f"--config.data.sources: tfds:{name} is not prepared in the ArrayRecord format "
            f"under {data_config.tfds_data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Prepare it once with "
            f"`tfds build {name} --file_format=array_record`, or set "
            "--config.data.tfds_data_dir") from None


def _tfds_split_sizes(name: str, data_config) -> dict[str, int]:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_config.tfds_data_dir or None)
        splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    except Exception:  # noqa: BLE001 - reported as unprepared below, with the fix
        splits = {}
    if not splits:
        _tfds_data_source(name, "train", data_config)  # raises the explanation
        raise UserError(f"--config.data.sources: tfds:{name} has no splits")
    return splits


@dataclasses.dataclass
class Malformed:
    """Malformed records seen while reading, and what to do about them."""
    policy: str                  # "error" or "skip"
    count: int = 0
    first: str = ""

    def report(self, where: str, what: str) -> None:
        if self.policy != "skip":
            raise UserError(f"{where}: {what}. Fix or remove it, or set "
                            "--config.data.on_malformed=skip to count and skip such records")
        self.count += 1
        self.first = self.first or f"{where}: {what}"


def in_validation(text: str, fraction: float) -> bool:
    """Whether a file-source document belongs to the validation split: by its text alone."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def documents(spec: SourceSpec, unit: Unit, data_config,
              malformed: Malformed) -> Iterator[tuple[str, str]]:
    """(split, text) of every document of a unit, in order."""
    if spec.kind == "tiny_shakespeare":
        if not unit.files:
            yield unit.split, _shakespeare_from_tfds(unit.split, data_config)
            return
        text = _read_text(Path(unit.files[0]), malformed)
        if text is not None:
            yield unit.split, split_like_tfds(text)[unit.split]
        return
    if spec.kind == "tfds":
        yield from _tfds_documents(spec, unit, data_config, malformed)
        return
    fraction = data_config.validation_fraction
    for name in unit.files:
        for text in _file_documents(spec.kind, Path(name), data_config.text_field, malformed):
            if text:
                yield ("validation" if in_validation(text, fraction) else "train"), text


def _read_text(path: Path, malformed: Malformed) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        malformed.report(str(path), f"not UTF-8 text (byte {e.start})")
        return None


def _file_documents(kind: str, path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    if kind == "text":
        text = _read_text(path, malformed)
        if text is not None:
            yield text
    elif kind == "jsonl":
        yield from _jsonl_documents(path, field, malformed)
    else:
        yield from _parquet_documents(path, field)


def _jsonl_documents(path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                malformed.report(where, f"not UTF-8 text (byte {e.start} of the line)")
                continue
            except json.JSONDecodeError as e:
                malformed.report(where, f"not a JSON object ({e.msg})")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                malformed.report(where, f"no text field {field!r} (set "
                                 "--config.data.text_field to the field that holds the text)")
                continue
            yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise UserError(f"{path}: no column {field!r}; columns: "
                            f"{', '.join(table.schema_arrow.names)} (set "
                            "--config.data.text_field)")
        for batch in table.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
    except UserError:
        raise
    except Exception as e:  # pyarrow's errors for a damaged file
        raise UserError(f"{path}: cannot read it as Parquet ({e})") from None


def _tfds_documents(spec: SourceSpec, unit: Unit, data_config,
                    malformed: Malformed) -> Iterator[tuple[str, str]]:
    source = _tfds_data_source(spec.argument, unit.split, data_config)
    field = data_config.text_field
    for index in range(unit.start, unit.stop):
        record = source[index]
        text = record.get(field) if isinstance(record, dict) else None
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                malformed.report(f"tfds:{spec.argument}[{unit.split}][{index}]",
                                 "not UTF-8 text")
                continue
        if not isinstance(text, str):
            malformed.report(f"tfds:{spec.argument}[{unit.split}][{index}]",
                             f"no text feature {field!r} (set --config.data.text_field)")
            continue
        yield unit.split, text
