#!/usr/bin/env bash
# Runs a command as one rank of a data-parallel job under Slurm: maps the variables
# srun sets to the ones moecert (like torchrun's workers) joins its group with, then
# execs the command. One srun task per rank (docs/distributed.md):
#
#   srun --nodes=2 --ntasks-per-node=4 scripts/slurm-env.sh build/moecert train ...
#
# MASTER_ADDR defaults to the job's first node, MASTER_PORT to a port derived from the
# job id; set either beforehand to override it.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: scripts/slurm-env.sh COMMAND [ARGS...] (run under srun, one task per rank)" >&2
  exit 2
fi
for v in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID; do
  if [[ -z "${!v:-}" ]]; then
    echo "slurm-env.sh: $v is not set: run this under srun (one task per rank)" >&2
    exit 2
  fi
done
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
# "4" or "4(x2)": tasks on this node.
tasks_here=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
export LOCAL_WORLD_SIZE=${tasks_here%%[(,]*}
if [[ -z "${MASTER_ADDR:-}" ]]; then
  if [[ -z "${SLURM_JOB_NODELIST:-}" ]] || ! command -v scontrol >/dev/null; then
    echo "slurm-env.sh: set MASTER_ADDR (no SLURM_JOB_NODELIST or no scontrol to read it from)" >&2
    exit 2
  fi
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
fi
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
exec "$@"
