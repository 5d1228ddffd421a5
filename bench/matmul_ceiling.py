"""The large-matmul FLOP/s of this machine: the ceiling every training benchmark is judged by.

A model can turn no more of the CPU into useful FLOPs than one big, well-shaped matmul does,
so both training benchmarks report their model FLOP/s as a fraction of this figure. XLA and
torch are measured in the same process, on the same operands:

    python bench/matmul_ceiling.py [--sizes=2048,4096] [--repeats=N] [--json=PATH]

Each figure is 2·n³ over the median time of `repeats` products after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from machine_load import cpu_seconds, print_load
from results import Contender, write_results

from scaling.runtime import platforms

SIZE = 2048  # the ceiling the other benchmarks quote
REPEATS = 10


def xla_matmul_flops(n: int = SIZE, repeats: int = REPEATS) -> list[float]:
    """FLOP/s of each of `repeats` jitted float32 (n, n) @ (n, n) products."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return rates


def torch_matmul_flops(n: int = SIZE, repeats: int = REPEATS) -> list[float] | None:
    """The same product through torch's BLAS on all cores; None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return rates


def ceilings(n: int = SIZE, repeats: int = REPEATS) -> dict[str, float]:
    """Median FLOP/s of XLA and (when installed) torch at one size, for the other benchmarks."""
    out = {"xla": statistics.median(xla_matmul_flops(n, repeats))}
    torch_rates = torch_matmul_flops(n, repeats)
    if torch_rates is not None:
        out["torch"] = statistics.median(torch_rates)
    return out


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=f"{SIZE},4096",
                        help="comma-separated matrix sizes n, each an (n, n) @ (n, n) product")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed products per size")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes={args.sizes}: expected comma-separated integers like 2048,4096")
    if args.repeats < 1 or any(n < 1 for n in sizes):
        parser.error("--sizes and --repeats must be positive")

    start = cpu_seconds()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
          f"float32 (n, n) @ (n, n), median of {args.repeats}", flush=True)
    contenders = []
    for n in sizes:
        xla = Contender(f"xla {n}", xla_matmul_flops(n, args.repeats))
        contenders.append(xla)
        torch_rates = torch_matmul_flops(n, args.repeats)
        if torch_rates is None:
            print(f"torch {n}: skipped (torch is not installed)")
        else:
            contenders.append(Contender(f"torch {n}", torch_rates, baseline=xla))
    print(f"{'contender':<12} {'GFLOP/s':>8} {'vs xla':>7}")
    for contender in contenders:
        print(f"{contender.name:<12} {contender.median / 1e9:>8.1f} {contender.ratio:>6.2f}x")
    share = print_load(start)
    if args.json:
        write_results(args.json, "matmul_ceiling", "FLOP/s", higher_is_better=True,
                      contenders=contenders, others_cpu_share=share,
                      details={"sizes": sizes, "repeats": args.repeats})


if __name__ == "__main__":
    sys.exit(main())
