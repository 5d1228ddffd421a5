"""The corpus pipeline at scale: prepare throughput, loader throughput, memory, data waits.

    python bench/corpus_pipeline.py [--sizes_mb=100,1000] [--steps=60] [--json=PATH]

For each size, in one invocation:

1. A synthetic corpus of JSON Lines is written (documents of 200 B to 20 KB drawn from a
   Zipf-distributed vocabulary; each document is unique, so none is deduplicated away).
2. `--mode=prepare` tokenizes it with 2 worker processes (bytes: one token a byte, so the
   figure is the pipeline's own cost: JSON parsing, the validation hash, writing shards).
3. The loader alone reads as many steps of `python_code_lm` batches as it can for a few
   seconds, in this process, against what the training step consumes.
4. `python_code_lm` trains `--steps` steps on it in a subprocess whose resident memory (with
   any child processes) is sampled every 50 ms; `metrics.jsonl` gives the share of step time
   the loop waited for data.

The two sizes share everything but the corpus, so peak memory that does not grow from the
small to the large corpus is memory bounded by the prefetch buffers, not by the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine_load import cpu_seconds, print_load
from results import Check, Contender, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXPERIMENT = str(REPO / "experiments" / "python_code_lm.py")
RSS_LIMIT = 2 * 2**30
FILE_BYTES = 64 * 2**20


def write_corpus(directory: Path, megabytes: int, seed: int = 0) -> int:
    """JSON Lines files of unique documents, about `megabytes` MB in all; returns bytes."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(5000)] + ["def", "return", "the", "of", "(", ")", ":"]
    ranks = np.minimum(rng.zipf(1.3, 400_000) - 1, len(words) - 1)
    text = " ".join(words[r] for r in ranks)
    pool = []
    for _ in range(500):
        start, length = int(rng.integers(0, len(text) - 20_000)), int(rng.integers(200, 20_000))
        pool.append(json.dumps(text[start:start + length]))
    directory.mkdir(parents=True, exist_ok=True)
    total, number, index = 0, 0, 0
    target = megabytes * 10**6
    while total < target:
        with open(directory / f"part-{number:04d}.jsonl", "w") as f:
            written = 0
            while written < FILE_BYTES and total + written < target:
                line = f'{{"id": {index}, "text": "{index} {pool[index % len(pool)][1:]}}}\n'
                f.write(line)
                written += len(line)
                index += 1
        total += written
        number += 1
    return total


def common_args(corpus: Path, prepared: Path) -> list[str]:
    return [f"--experiment={EXPERIMENT}", f"--config.data.sources=jsonl:{corpus}/*.jsonl",
            f"--config.data.prepared_dir={prepared}", "--config.data.prepare_workers=2"]


def prepare(corpus: Path, prepared: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scaling.main", *common_args(corpus, prepared),
                    "--mode=prepare"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (manifest_path,) = prepared.glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"seconds": seconds, "mb_per_s": manifest["bytes"] / 1e6 / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens}


def loader_steps_per_second(corpus: Path, prepared: Path, seconds: float = 5.0) -> float:
    """Training steps of rows the loader reads per second, reading in this process."""
    from scaling.config import experiments as config_lib
    from scaling.data import loader, text

    config = config_lib.load_config(EXPERIMENT, [
        a.removeprefix("--config.") for a in common_args(corpus, prepared)[1:]])[0]
    corpus_data = text.load_text_corpus(config)
    rows = np.arange(config.batch_size)
    reader = loader.TrainLoader(corpus_data, 0, config.batch_size, rows, 0, 10**9,
                                prefetch_steps=0)
    reader.next(1)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        reader.next(10)
        steps += 10
    return steps / (time.perf_counter() - start)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def train(corpus: Path, prepared: Path, workdir: Path, steps: int) -> dict:
    command = [sys.executable, "-m", "scaling.main", *common_args(corpus, prepared),
               f"--workdir={workdir}", f"--config.num_steps={steps}",
               "--config.log_every_steps=10", "--config.eval_every_steps=1000000",
               "--config.checkpoint_every_steps=1000000", "--config.data.eval_max_windows=64",
               f"--config.optimizer.warmup_steps={steps // 4}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if process.wait() != 0:
        raise RuntimeError(f"training failed: {' '.join(command)}")
    sampler.join()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train_records = [r for r in records if r["split"] == "train"][1:]  # after the compile
    return {"peak_rss": peak[0],
            "data_wait_fraction": statistics.median(r["data_wait_fraction"]
                                                    for r in train_records),
            "steps_per_s": statistics.median(r["examples_per_sec"] for r in train_records)
            / 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mb", default="100,1000")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the corpora (default: a temporary one, removed)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="corpus_bench_"))
    os.environ.pop("XLA_FLAGS", None)
    start_load = cpu_seconds()
    results = {}
    try:
        for size in sizes:
            corpus, prepared = scratch / f"corpus_{size}", scratch / f"prepared_{size}"
            written = write_corpus(corpus, size)
            prepared_stats = prepare(corpus, prepared)
            reading = loader_steps_per_second(corpus, prepared)
            training = train(corpus, prepared, scratch / f"run_{size}", args.steps)
            results[size] = {"corpus_bytes": written, **prepared_stats,
                             "loader_steps_per_s": reading, **training}
            print(f"{size} MB: prepare {prepared_stats['mb_per_s']:.1f} MB/s "
                  f"({prepared_stats['tokens_per_s'] / 1e6:.2f}M tokens/s, 2 workers); loader "
                  f"{reading:.0f} steps/s against {training['steps_per_s']:.2f} consumed "
                  f"({reading / training['steps_per_s']:.0f}x); peak RSS "
                  f"{training['peak_rss'] / 2**20:.0f} MiB; waiting for data "
                  f"{training['data_wait_fraction']:.2%} of step time", flush=True)
            shutil.rmtree(corpus)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    share = print_load(start_load)
    small, large = results[sizes[0]], results[sizes[-1]]
    checks = [
        Check(f"peak RSS at {sizes[-1]} MB / {RSS_LIMIT >> 30} GiB",
              large["peak_rss"] / RSS_LIMIT, at_most=1.0),
        Check(f"peak RSS {sizes[-1]} MB / {sizes[0]} MB", large["peak_rss"] / small["peak_rss"],
              at_most=1.1),
        Check("data wait / step time", max(r["data_wait_fraction"] for r in results.values()),
              at_most=0.05),
        Check("loader steps/s / steps/s consumed",
              min(r["loader_steps_per_s"] / r["steps_per_s"] for r in results.values()),
              at_least=1.0),
    ]
    for check in checks:
        print(check.line())
    if args.json:
        contenders = [Contender(f"prepare {size} MB", [r["mb_per_s"]])
                      for size, r in results.items()]
        write_results(args.json, "corpus_pipeline", "MB/s prepared", higher_is_better=True,
                      contenders=contenders, others_cpu_share=share, checks=checks,
                      details={str(k): v for k, v in results.items()})


if __name__ == "__main__":
    main()
