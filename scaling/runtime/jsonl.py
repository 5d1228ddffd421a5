"""Append-only JSON Lines logs (`metrics.jsonl`, `provenance.jsonl`) that survive crashes.

A kill or a full disk can leave the last line torn. Appending after it would glue the next
record onto the fragment, and a reader would choke on it. So before a run appends, `settle`
checks the file: a torn or unparseable line is set aside in `NAME.torn` (appended there,
never lost) and records the caller no longer wants (logged past the checkpoint a run resumes
from) are dropped. The file is then rewritten to a staged copy that replaces it by rename,
so a crash at any moment leaves either the old file or the new one whole. When nothing needs
changing, which is every start but the first after a crash, only the file's tail is read
and nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

TAIL_BYTES = 1 << 16


def _record(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _tail_is_settled(path: Path, keep: Callable[[dict], bool]) -> bool:
    """Whether the file ends with a newline after a whole record that `keep` accepts; the
    records are in step order, so then every earlier one is kept too."""
    size = path.stat().st_size
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    if not tail.endswith(b"\n"):
        return False
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    record = _record(last)
    return record is not None and keep(record)


def settle(path: Path, keep: Callable[[dict], bool] = lambda record: True,
           what: str = "records") -> tuple[int, int]:
    """Make `path` safe to append to: torn lines set aside, unwanted records dropped.
    Returns (lines set aside, records dropped); a warning names both when either is not 0."""
    path = Path(path)
    if not path.exists() or _tail_is_settled(path, keep):
        return 0, 0
    staged = path.with_name(f".{path.name}.settling")
    torn, dropped = [], 0
    with open(path, "rb") as source, open(staged, "wb") as out:
        for line in source:
            record = _record(line) if line.endswith(b"\n") else None
            if record is None:
                if line.strip():
                    torn.append(line if line.endswith(b"\n") else line + b"\n")
                continue
            if keep(record):
                out.write(line)
            else:
                dropped += 1
        out.flush()
        os.fsync(out.fileno())
    if torn:
        with open(path.with_name(path.name + ".torn"), "ab") as aside:
            aside.writelines(torn)
            aside.flush()
            os.fsync(aside.fileno())
    os.replace(staged, path)
    if torn:
        print(f"warning: {path}: set aside {len(torn)} torn or unreadable lines in "
              f"{path.name}.torn (a run was killed while writing it)", file=sys.stderr)
    if dropped:
        print(f"note: {path}: dropped {dropped} {what} logged past the checkpoint this run "
              "resumes from; those steps run again", file=sys.stderr)
    return len(torn), dropped


def read(path: Path) -> Iterator[dict]:
    """Every whole record of `path`; a torn or unreadable line is skipped."""
    with open(path, "rb") as f:
        for line in f:
            record = _record(line)
            if record is not None:
                yield record
