#!/usr/bin/env python3
"""Run one experiment as N processes on this machine, each with its own fake CPU devices.

A faithful double of a multi-host pod: the processes meet through a coordinator on
127.0.0.1, exchange data over gloo, and each loads only its shard of every batch. Everything
after `--` is passed to `python -m scaling.main` as separate arguments, never through a
shell.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        --experiment=fashion_mnist_mlp --workdir=/tmp/run
    python launch/local.py --dry_run ...   # print the commands instead of running them

Process 0's output is shown as is; the others' lines are prefixed with their id. If one
process fails, the others get `--distributed_timeout` seconds to notice before they are
stopped, and the launcher exits with the first failure's code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(num_processes: int, port: int, timeout: int, args: list[str]) -> list[list[str]]:
    coordinator = f"127.0.0.1:{port}"
    return [[sys.executable, "-m", "scaling.main", *args,
             f"--coordinator_address={coordinator}", f"--num_processes={num_processes}",
             f"--process_id={i}", f"--distributed_timeout={timeout}"]
            for i in range(num_processes)]


def environment(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    kept = [flag for flag in env.get("XLA_FLAGS", "").split()
            if not flag.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join(
        kept + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def relay(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def run(cmds: list[list[str]], env: dict[str, str], timeout: int) -> int:
    processes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    relays = [threading.Thread(target=relay, args=(p, "" if i == 0 else f"[{i}] "),
                               daemon=True) for i, p in enumerate(processes)]
    for thread in relays:
        thread.start()
    failed_at = None
    while any(p.poll() is None for p in processes):
        codes = [p.poll() for p in processes]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > timeout:
            for p in processes:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    for thread in relays:
        thread.join(timeout=5)
    codes = [p.returncode for p in processes]
    failures = [c for c in codes if c != 0]
    if failures:
        print(f"launch/local.py: exit codes by process: {codes}", file=sys.stderr)
        return failures[0] if failures[0] > 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [options] -- SCALING_MAIN_ARGS ...")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=int, default=60,
                        help="seconds before a lost process fails the others")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands, one per line, and exit")
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    options = parser.parse_args(ours)
    if options.num_processes < 1 or options.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be positive")
    port = options.port or free_port()
    cmds = commands(options.num_processes, port, options.timeout, rest)
    env = environment(options.devices_per_process)
    if options.dry_run:
        for cmd in cmds:
            print(f"XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} JAX_PLATFORMS=cpu "
                  + shlex.join(cmd))
        return 0
    return run(cmds, env, options.timeout)


if __name__ == "__main__":
    sys.exit(main())
