"""JAX's persistent compilation cache, on by default so a re-run skips XLA compilation.

The location is a property of the machine, not of the experiment: it comes from
`--compilation_cache_dir`, else `$SCALING_CACHE_DIR`, else `~/.cache/scaling/jax`, and never
enters config.json. An empty location turns the cache off. Entries are keyed by the lowered
program, compile options, devices and jax version, so a stale entry is never used; the cache
only saves compile time. Tracing and lowering still happen on every start.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from scaling.errors import UserError

CACHE_DIR_ENV = "SCALING_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/scaling/jax"
# Least recently used entries go beyond this size (needs the `filelock` package).
MAX_CACHE_BYTES = 4 * 2**30


def resolve_cache_dir(flag_value: str | None) -> tuple[str, str]:
    """The cache location and where it came from, for messages: the flag, the environment
    variable or the built-in default."""
    if flag_value is not None:
        return flag_value, f"--compilation_cache_dir={flag_value}"
    if CACHE_DIR_ENV in os.environ:
        value = os.environ[CACHE_DIR_ENV]
        return value, f"${CACHE_DIR_ENV}={value}"
    return DEFAULT_CACHE_DIR, f"the default compilation cache {DEFAULT_CACHE_DIR}"


def enable(flag_value: str | None) -> Path | None:
    """Point JAX's persistent cache at the resolved location; None when it is off.

    A location the user chose that cannot be written is a UserError. The built-in default
    only earns a one-line warning, since a read-only home must not stop a run.
    """
    location, source = resolve_cache_dir(flag_value)
    if not location:
        return None
    path = Path(location).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        message = (f"{source}: cannot write there ({e.strerror}); choose a writable "
                   "directory, or pass --compilation_cache_dir= to turn the cache off")
        if flag_value is None and CACHE_DIR_ENV not in os.environ:
            print(f"warning: {message}; running without it", file=sys.stderr, flush=True)
            return None
        raise UserError(message) from None

    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX caches only compiles over one second by default; on a CPU the steps of small
    # models compile faster than that, and start-up is exactly what the cache is for.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if importlib.util.find_spec("filelock") is not None:
        # A bound also turns on jax's file lock, so concurrent runs never read half an entry.
        jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path
