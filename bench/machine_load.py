"""How much of the machine other processes took during a benchmark.

The load average would count the benchmark itself; /proc/stat minus this process's own CPU
time says what everything else used. Benchmarks warn when that share is large, because
timings and ratios from a shared machine are noise.
"""

from __future__ import annotations

import os
import time

BUSY_SHARE = 0.05  # share of the machine used by other processes that distorts the timings


def cpu_seconds() -> tuple[float, float, float] | None:
    """Wall time, CPU time of the whole machine and of this process, for `others_share`.

    The load average would also count this benchmark and the runs before it; /proc/stat
    minus our own usage says what other processes took. None where /proc is missing.
    """
    try:
        with open("/proc/stat") as f:
            jiffies = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # everything but idle and iowait
    own = os.times()
    return time.time(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_share(start: tuple[float, float, float] | None) -> float | None:
    """Fraction of all cores that other processes used since `start`."""
    end = cpu_seconds()
    if start is None or end is None:
        return None
    wall, machine, own = (e - s for e, s in zip(end, start, strict=True))
    return max(machine - own, 0.0) / (wall * (os.cpu_count() or 1))
