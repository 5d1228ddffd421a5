#!/usr/bin/env bash
# Run one scaling experiment on a Cloud TPU VM pod slice (or several slices), end to end:
# create the TPU, copy this checkout to every worker, install, run the same
# `python -m scaling.main ...` on all workers while streaming their logs, then delete it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] -- SCALING_MAIN_ARGS...

Options:
  --name NAME           TPU (or queued resource) name; required
  --zone ZONE           Cloud zone, e.g. us-east5-a; required
  --project PROJECT     Cloud project (default: gcloud's configured one)
  --accelerator TYPE    accelerator type (default: v5p-128)
  --version VERSION     TPU runtime version (default: v2-alpha-tpuv5)
  --num-slices N        N > 1 creates a multi-slice queued resource; pair it with
                        --config.mesh.dcn_data=N (or another dcn_ axis)
  --code DIR            checkout to copy to the workers (default: this repository)
  --keep                do not delete the TPU at the end
  --dry-run             print each command instead of running it
  -h, --help            show this help

Everything after `--` reaches `python -m scaling.main` on every worker as separate
arguments: each is quoted with printf %q, so the remote shell rebuilds the same argv and
never interprets it.

Example:
  launch/tpu_pod.sh --name lm8b --zone us-east5-a --accelerator v5p-128 -- \
      --experiment=lm_8b --workdir=gs://my-bucket/runs/lm8b
USAGE
}

name="" zone="" project="" accelerator="v5p-128" version="v2-alpha-tpuv5"
num_slices=1 keep=0 dry_run=0
code="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --num-slices) num_slices="$2"; shift 2 ;;
    --code) code="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
scaling_args=("$@")

if [[ -z "$name" || -z "$zone" ]]; then
  echo "error: --name and --zone are required (see --help)" >&2; exit 2
fi
if ! [[ "$num_slices" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --num-slices=$num_slices must be a positive integer" >&2; exit 2
fi
if [[ ${#scaling_args[@]} -eq 0 ]]; then
  echo "error: give the scaling.main arguments after --, e.g. -- --experiment=lm_8b" >&2
  exit 2
fi

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

# The remote command: every scaling argument quoted on its own.
remote_run="cd ~/scaling && python -m scaling.main"
for arg in "${scaling_args[@]}"; do
  remote_run+=" $(printf '%q' "$arg")"
done
install="cd ~/scaling && pip install -e . 'jax[tpu]'"

if [[ "$num_slices" -eq 1 ]]; then
  nodes=("$name")
  run gcloud compute tpus tpu-vm create "$name" "${common[@]}" \
    --accelerator-type="$accelerator" --version="$version"
else
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("$name-$i"); done
  run gcloud compute tpus queued-resources create "$name" "${common[@]}" \
    --accelerator-type="$accelerator" --runtime-version="$version" \
    --node-count="$num_slices" --node-prefix="$name"
fi

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [[ $keep -eq 1 ]]; then return; fi
  if [[ "$num_slices" -eq 1 ]]; then
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  else
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  fi
}
trap cleanup EXIT

for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm scp --recurse "$code" "$node:~/scaling" "${common[@]}" \
    --worker=all
  run gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all --command="$install"
done

# Start every slice's workers together; their output streams to this terminal.
pids=()
for node in "${nodes[@]}"; do
  if [[ $dry_run -eq 1 ]]; then
    run gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all \
      --command="$remote_run"
  else
    run gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all \
      --command="$remote_run" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
