"""Append-only logs: a torn last line is set aside, never fatal and never glued to the next
record; dropping records past a checkpoint replaces the file whole or not at all."""

import json
import os

import pytest
from conftest import run_cli

from scaling.runtime import jsonl
from scaling.runtime.metrics import read_metrics


def records(n: int) -> bytes:
    return b"".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}).encode() + b"\n"
                    for s in range(1, n + 1))


def test_a_settled_file_is_left_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(records(5))
    before = os.stat(path)
    assert jsonl.settle(path, lambda r: r["step"] <= 5) == (0, 0)
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_torn_last_line_is_set_aside_and_later_records_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(records(6) + b'{"step": 7, "split": "tr')
    assert jsonl.settle(path, lambda r: r["step"] <= 4, "metrics records") == (1, 2)
    assert path.read_bytes() == records(4)
    assert (tmp_path / "metrics.jsonl.torn").read_bytes() == b'{"step": 7, "split": "tr\n'
    err = capsys.readouterr().err
    assert "set aside 1 torn" in err and "dropped 2 metrics records" in err
    assert not list(tmp_path.glob(".*settling"))


def test_a_crash_while_settling_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = records(50) + b"{torn"
    path.write_bytes(original)

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        jsonl.settle(path, lambda r: r["step"] <= 10)
    assert path.read_bytes() == original
    monkeypatch.undo()
    jsonl.settle(path, lambda r: r["step"] <= 10)  # the next start finishes the job
    assert path.read_bytes() == records(10)


def test_readers_skip_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(records(3) + b'{"step": 4')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_training_resumes_past_a_torn_metrics_line_and_provenance_keeps_every_start(
        tmp_path, tiny_idx_dir):
    args = ("--experiment=fashion_mnist_mlp", f"--workdir={tmp_path}",
            f"--config.data.manual_dir={tiny_idx_dir}", "--config.num_steps=4",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
            "--config.batch_size=32")
    assert run_cli(*args).returncode == 0
    metrics, provenance = tmp_path / "metrics.jsonl", tmp_path / "provenance.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"step": 5, "split": "train", "lo')  # as a kill mid-write leaves it
    with open(provenance, "ab") as f:
        f.write(b'{"time": "2026-')
    result = run_cli(*args[:-3], "--config.num_steps=6", "--config.log_every_steps=1",
                     "--config.checkpoint_every_steps=2", "--config.batch_size=32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "set aside 1 torn" in result.stderr
    steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    starts = [json.loads(line) for line in provenance.read_text().splitlines()]
    assert [s["mode"] for s in starts] == ["train", "train"]
    assert (tmp_path / "provenance.jsonl.torn").read_text() == '{"time": "2026-\n'


def test_a_failed_metrics_write_exits_74_naming_the_file(tmp_path, capsys, monkeypatch):
    from scaling.errors import exit_on_error
    from scaling.runtime.metrics import MetricsWriter

    def leave(code):  # exit_on_error skips teardown with os._exit, which would end pytest
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)

    writer = MetricsWriter(tmp_path)

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    writer._file = FullDisk()
    with pytest.raises(SystemExit) as exited:
        exit_on_error(writer.write, 1, "train")
    assert exited.value.code == 74
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'metrics.jsonl'}: No space left on device")


SETTLE = """
import sys
from scaling.runtime import jsonl
print("settling", flush=True)
jsonl.settle(sys.argv[1], lambda r: r["step"] <= 1000)
"""


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_a_kill_while_settling_leaves_the_history_whole(delay, tmp_path):
    """SIGKILL a process settling a large log at some moment: afterwards the file is the
    old one or the settled one, byte for byte, never a part of either."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "metrics.jsonl"
    original = records(200_000) + b'{"step": 200001, "spl'
    path.write_bytes(original)
    process = subprocess.Popen([sys.executable, "-c", SETTLE, str(path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "settling\n"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert path.read_bytes() in (original, records(1000))
