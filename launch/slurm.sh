#!/usr/bin/env bash
# Submit one scaling experiment to a SLURM GPU cluster: one process per GPU, all nodes
# running the same `python -m scaling.main ...`; JAX finds its peers from SLURM's variables.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh [options] -- SCALING_MAIN_ARGS...

Options:
  --nodes N            nodes (default: 1)
  --gpus-per-node G    GPUs per node, one process each (default: 8)
  --partition NAME     SLURM partition
  --account NAME       SLURM account
  --time LIMIT         wall-clock limit, e.g. 24:00:00 (default: 04:00:00)
  --dry-run            print the sbatch command instead of submitting it
  -h, --help           show this help

The job script, launch/slurm_job.sbatch, runs `srun python -m scaling.main "$@"`: the
arguments after `--` travel as an array from here to every process, never through a
shell string. srun --kill-on-bad-exit=1 stops the whole job when one process fails.

Example:
  launch/slurm.sh --nodes 2 --gpus-per-node 8 -- --experiment=lm_1b --workdir=/shared/runs/lm1b
USAGE
}

nodes=1 gpus=8 partition="" account="" time_limit="04:00:00" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for value in "$nodes" "$gpus"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nodes and --gpus-per-node must be positive integers" >&2; exit 2
  fi
done
if [[ $# -eq 0 ]]; then
  echo "error: give the scaling.main arguments after --, e.g. -- --experiment=lm_1b" >&2
  exit 2
fi

job="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm_job.sbatch"
cmd=(sbatch --job-name=scaling --nodes="$nodes" --ntasks-per-node="$gpus"
     --gpus-per-node="$gpus" --time="$time_limit")
[[ -n "$partition" ]] && cmd+=(--partition="$partition")
[[ -n "$account" ]] && cmd+=(--account="$account")
cmd+=("$job" "$@")

if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; printf '\n'
else
  "${cmd[@]}"
fi
