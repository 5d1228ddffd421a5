"""`python -m scaling.report`: curves of several runs from their metrics.jsonl, as one PNG."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from scaling import report


def write_run(workdir, *, final_loss: float, speed: float, seed: int) -> None:
    """metrics.jsonl shaped like the trainer's: a train record every 10 steps with
    throughput, a test record every 50 steps, and the final test record."""
    rng = np.random.default_rng(seed)
    workdir.mkdir(parents=True)
    records = []
    for step in range(10, 201, 10):
        loss = final_loss + 2.0 * np.exp(-step / 40) + 0.02 * rng.standard_normal()
        records.append({"step": step, "split": "train", "time": 1e9 + step, "loss": loss,
                        "accuracy": 1 - loss / 3, "grad_norm": 1.0, "learning_rate": 1e-3,
                        "examples_per_sec": speed * (0.3 if step == 10 else 1.0),
                        "tflops_per_device": 1e-3})
        if step % 50 == 0:
            records.append({"step": step, "split": "test", "time": 1e9 + step,
                            "loss": loss + 0.05, "accuracy": 1 - (loss + 0.05) / 3,
                            "num_examples": 10000})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_report(*args, cwd):
    return subprocess.run([sys.executable, "-m", "scaling.report", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pixels_near(image: np.ndarray, rgb: np.ndarray, tolerance: int = 40) -> int:
    return int((np.abs(image.astype(int) - rgb).sum(-1) < tolerance).sum())


def test_two_runs_in_one_png(tmp_path):
    write_run(tmp_path / "lr_1e-3", final_loss=0.3, speed=40_000, seed=0)
    write_run(tmp_path / "lr_3e-4", final_loss=0.5, speed=38_000, seed=1)
    out = tmp_path / "out" / "curves.png"
    result = run_report(tmp_path / "lr_1e-3", tmp_path / "lr_3e-4", f"--out={out}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    # Loss, accuracy and examples/s panels side by side.
    assert png_size(out) == (3 * report.PANEL_SIZE[0] * report.DPI,
                             report.PANEL_SIZE[1] * report.DPI)
    image = np.asarray(Image.open(out).convert("RGB"))
    first, second = report_colours()
    # Each run has its own colour, drawn in all three panels.
    width = image.shape[1] // 3
    for panel in range(3):
        part = image[:, panel * width:(panel + 1) * width]
        assert pixels_near(part, first) > 100 and pixels_near(part, second) > 100, panel


def report_colours() -> list[np.ndarray]:
    """The first two colours of matplotlib's cycle, which the report gives the runs."""
    import matplotlib.colors
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"][:2]
    return [np.array(matplotlib.colors.to_rgb(c)) * 255 for c in colours]


def test_runs_without_accuracy_get_two_panels_and_tokens_per_sec(tmp_path):
    workdir = tmp_path / "lm"
    workdir.mkdir()
    records = [{"step": s, "split": "train", "loss": 4.0 / s, "tokens_per_sec": 1e4,
                "examples_per_sec": 80.0} for s in range(1, 6)]
    records.append({"step": 5, "split": "validation", "loss": 0.9, "perplexity": 2.46})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = report.load_runs([str(workdir)])
    assert report.throughput_key(runs) == "tokens_per_sec"
    assert report.splits_of(runs["lm"]) == ["train", "validation"]
    out = report.plot_runs(runs, tmp_path / "lm.png")
    assert png_size(out) == (2 * report.PANEL_SIZE[0] * report.DPI,
                             report.PANEL_SIZE[1] * report.DPI)


@pytest.mark.parametrize("content, fragment", [
    (None, "metrics.jsonl: no such file"),
    ("", "metrics.jsonl: holds no records yet"),
    ("not json\n", "metrics.jsonl: not JSON lines"),
])
def test_missing_empty_or_broken_metrics_exit_2(tmp_path, content, fragment):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if content is not None:
        (workdir / "metrics.jsonl").write_text(content)
    result = run_report(workdir, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert fragment in line and str(workdir) in line
    assert not (tmp_path / "curves.png").exists()
