#!/usr/bin/env bash
# Runs one shard of a `moecert certify` or `moecert attack` command as task i of n of a
# launcher (docs/distributed.md): certify writes OUT_DIR/shard-i-of-n/results.json,
# attack OUT_DIR/shard-i-of-n.json; `moecert merge` joins the shards into the results
# of one unsharded run:
#
#   Slurm array: sbatch --array=0-7 --wrap "scripts/shard-run.sh runs/cert \
#                  build/moecert --samples 10000 certify CKPT --eps-grid 0.05,0.1"
#   torchrun:    torchrun --no_python --nproc_per_node=4 scripts/shard-run.sh runs/cert \
#                  build/moecert --samples 10000 certify CKPT --eps-grid 0.05,0.1
#   then:        build/moecert merge runs/cert/shard-*/results.json --out runs/cert/results.json
#   (attack:     build/moecert merge runs/atk/shard-*.json --out runs/atk/attack.json)
#
# i and n come from SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT
# (an array job), else from RANK and WORLD_SIZE (torchrun, srun with slurm-env.sh).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: scripts/shard-run.sh OUT_DIR MOECERT [OPTIONS] certify|attack CKPT [OPTIONS]" >&2
  exit 2
fi
out=$1
shift
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  if [[ -z "${SLURM_ARRAY_TASK_COUNT:-}" ]]; then
    echo "shard-run.sh: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not" >&2
    exit 2
  fi
  i=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
  n=$SLURM_ARRAY_TASK_COUNT
elif [[ -n "${WORLD_SIZE:-}" ]]; then
  i=${RANK:?shard-run.sh: WORLD_SIZE is set but RANK is not}
  n=$WORLD_SIZE
else
  echo "shard-run.sh: no task number: run it as a Slurm array task or under torchrun (RANK, WORLD_SIZE)" >&2
  exit 2
fi
command=""
for a in "$@"; do
  if [[ "$a" == certify || "$a" == attack ]]; then
    command=$a
    break
  fi
done
mkdir -p "$out"
case "$command" in
  certify) exec "$@" --shard "$i/$n" --out "$out/shard-$i-of-$n" ;;
  attack) exec "$@" --shard "$i/$n" --json "$out/shard-$i-of-$n.json" ;;
  *)
    echo "shard-run.sh: the command is neither certify nor attack: $*" >&2
    exit 2
    ;;
esac
