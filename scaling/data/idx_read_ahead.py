"""Start-up trick: parse the IDX files on a thread while the framework is still importing.

Decompressing Fashion-MNIST takes 0.25 s, and zlib releases the GIL while it works, so started
before the heavy imports it costs a run's start-up nothing. Results go into
`idx.pending_reads`, where `idx.read_idx` claims each.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import ml_collections

from scaling.data.idx import (
    ALL_IDX_FILES,
    has_idx_files,
    parse_idx,
    pending_reads,
    well_known_idx_directory,
)


def read_ahead(data_config: ml_collections.ConfigDict) -> None:
    """Start parsing the IDX files `load_image_dataset` will read first, on a daemon thread.

    Only local IDX directories are read ahead (the manual one, else the well-known ones when
    no TFDS directory is named); if the search then settles on a TFDS copy, the work is
    unused. Errors surface where the file is read, exactly as without read-ahead.
    """
    if data_config.manual_dir:
        directory = Path(data_config.manual_dir).expanduser()
        if not has_idx_files(directory):
            return
    elif not data_config.tfds_data_dir:
        directory = well_known_idx_directory(data_config.name)
        if directory is None:
            return
    else:
        return
    paths = [(directory / name).resolve() for name in ALL_IDX_FILES]
    futures = {path: Future() for path in paths if path not in pending_reads}

    def parse_all():
        for path, future in futures.items():
            try:
                future.set_result(parse_idx(path))
            except BaseException as e:  # handed to whoever reads the file
                future.set_exception(e)

    pending_reads.update(futures)
    threading.Thread(target=parse_all, name="idx-read-ahead", daemon=True).start()


