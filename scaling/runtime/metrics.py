"""Where metrics go: the console progress line, `metrics.jsonl` and TensorBoard.

Only process 0 writes. Every record carries `step`, `split` and a wall-clock `time`, so
benchmarks and reports can be computed from the file alone.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax

from scaling.runtime import jsonl


class MetricsWriter:
    """One JSON object per event in metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, workdir: Path, *, resume_step: int = 0, settle: bool = True):
        """`settle=False` appends without mending the file first: for a reader (eval)
        while a training run appends to the same file, which replacing it would cut off."""
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if not self.enabled:
            return
        if settle:
            self._drop_records_after(resume_step)
        self._file = self.path.open("a")
        self._tensorboard_dir = Path(workdir) / "tensorboard"

    def _drop_records_after(self, step: int) -> None:
        """A killed run may have logged past its last checkpoint (those steps run again), or
        left a torn last line; `jsonl.settle` mends both without rewriting in place."""
        jsonl.settle(self.path, lambda record: record.get("step", 0) <= step,
                     "metrics records")

    def write(self, step: int, split: str, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: _plain(v) for k, v in scalars.items()})
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # name the file: the exit message (74) says where
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self._tensorboard is None:  # made at the first event: tensorboardX takes 10 ms
            self._tensorboard = _import_summary_writer()(str(self._tensorboard_dir))
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tensorboard is not None:
                self._tensorboard.close()


def _import_summary_writer():
    """tensorboardX imports torch and boto3 when they are installed, to accept torch tensors
    and to write to S3. Events here are floats written to a local workdir, so both stay
    hidden during the import: about 1.7 s of every start on a 2-core CPU."""
    hidden = [name for name in ("torch", "boto3") if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None makes `import name` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        for name in hidden:
            del sys.modules[name]
    return SummaryWriter


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def throughput(examples_per_sec: float, items_per_example: int, flops_per_example: float | None,
               num_devices: int, peak_flops: float | None) -> dict[str, float]:
    """Examples (and tokens) per second, model TFLOP/s per device and, if the chip is known,
    MFU: achieved analytic FLOP/s over the chip's peak."""
    out = {"examples_per_sec": examples_per_sec}
    if items_per_example > 1:
        out["tokens_per_sec"] = examples_per_sec * items_per_example
    if flops_per_example is None:  # the model provides no FLOPs formula
        return out
    flops_per_device = examples_per_sec * flops_per_example / num_devices
    out["tflops_per_device"] = flops_per_device / 1e12
    if peak_flops:
        out["mfu"] = flops_per_device / peak_flops
    return out


def read_metrics(workdir: Path) -> list[dict]:
    """Every whole record of the workdir's metrics.jsonl (a torn last line is skipped)."""
    return list(jsonl.read(Path(workdir) / "metrics.jsonl"))


class Progress:
    """A live line on a terminal; plain log lines when output goes to a file."""

    def __init__(self, total_steps: int, stream=None):
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() and jax.process_index() == 0
        self.quiet = jax.process_index() != 0

    def update(self, step: int, loss: float, rates: dict[str, float], eta_sec: float) -> None:
        if self.quiet:
            return
        width = len(str(self.total_steps))
        speed = (f"{rates['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in rates
                 else f"{rates['examples_per_sec']:,.0f} examples/s")
        if "mfu" in rates:
            speed += f"  MFU {rates['mfu']:.1%}"
        line = (f"step {step:>{width}}/{self.total_steps}  loss {loss:.4f}  {speed}  "
                f"ETA {_duration(eta_sec)}")
        if self.live:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
