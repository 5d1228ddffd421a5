"""How much of the machine other processes took during a benchmark.

The load average would count the benchmark itself; /proc/stat minus this process's own CPU
time says what everything else used. Benchmarks warn when that share is large, because
timings and ratios from a shared machine are noise.
"""

from __future__ import annotations

import os
import resource
import time

BUSY_SHARE = 0.05  # share of the machine used by other processes that distorts the timings


def cpu_seconds() -> tuple[float, float, float] | None:
    """Wall time, CPU time of the whole machine and of this process (with the children it
    has waited for, so benchmarks that time subprocesses count them as their own), for
    `others_share`.

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
    return (time.time(), busy / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def others_share(start: tuple[float, float, float] | None) -> float | None:
    """Fraction of all cores that other processes used since `start`."""
    end = cpu_seconds()
    if start is None or end is None:
        return None
    wall, machine, own = (e - s for e, s in zip(end, start, strict=True))
    return max(machine - own, 0.0) / (wall * (os.cpu_count() or 1))


def print_load(start: tuple[float, float, float] | None) -> float | None:
    """Prints other processes' CPU share since `start`, warning when it distorts timings."""
    share = others_share(start)
    if share is not None:
        print(f"other processes used {share:.0%} of the CPU during the benchmark")
        if share > BUSY_SHARE:
            print("warning: the machine was shared, so timings and ratios are noisy "
                  "(multi-threaded baselines suffer most); rerun when it is quiet")
    return share


def page_faults() -> int:
    """Minor page faults of this process so far: fresh memory the kernel had to map in.

    XLA:CPU allocates each call's temporary buffers anew, and glibc hands buffers that large
    back to the kernel when they are freed, so every call faults its temporaries in again;
    benchmarks report the count because it costs time that no FLOP count shows.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
