"""Multi-process start-up: one process per host, found automatically or named by flags.

On a TPU pod slice and under SLURM, `jax.distributed.initialize` discovers the coordinator,
the process count and this process's id by itself. Anywhere else (several processes on one
machine, a hand-made cluster) the three flags name them. On CPU the collectives go over gloo.
The coordination service's heartbeat makes the survivors of a dead process fail within the
timeout instead of waiting forever in a collective.
"""

from __future__ import annotations

import os

import jax

from scaling.errors import UserError


def on_tpu_pod() -> bool:
    """A multi-host TPU slice, or several slices joined over DCN."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def under_slurm() -> bool:
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or "1"
    return bool(os.environ.get("SLURM_JOB_ID")) and tasks.isdigit() and int(tasks) > 1


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeout_seconds: int) -> str:
    """Join the other processes, if there are any; says how the run was set up."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise UserError("--coordinator_address, --num_processes and --process_id go "
                            "together: give all three, or none to detect a TPU pod or SLURM")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id}: must lie in [0, {num_processes}) "
                            f"for --num_processes={num_processes}")
        if timeout_seconds < 1:
            raise UserError(f"--distributed_timeout={timeout_seconds}: must be positive")
        how = f"process {process_id} of {num_processes} via {coordinator_address}"
    elif on_tpu_pod():
        how = "TPU pod (detected)"
    elif under_slurm():
        how = "SLURM (detected)"
    else:
        return "single process"
    # Only CPU collectives read this; accelerators keep their own (ICI, NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=timeout_seconds)
    return how
