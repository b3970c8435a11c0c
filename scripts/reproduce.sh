#!/usr/bin/env bash
# Reproduction study (issue: robust training). On Fashion-MNIST, with the same
# budget for every method (cnn-s experts, E = 4, L-inf eps = 0.1, the same epochs,
# data, seed and optimizer), trains:
#   ST, AT, TRADES, RT-ER MoEs (model-level, top-1, linear router);
#   AdvMoE on a MoE-CNN (N = 2, r = 0.5), AT on the same MoE-CNN, AT on the dense cnn-s;
#   JTDMoE (alpha = 0.8) from scratch;
# builds the dual-model ST + RT-ER (alpha = 0.8) and sweeps alpha = 0.5..1.0; then
# attacks every model on the test set with PGD-50 (RA, RA-E, RA-R) and writes the
# table to docs/results.md (scripts/results_table.py).
# Every stage is skipped when its output exists: rerunning resumes the study.
# Budget: about 35 minutes on 2 cores after the build with the defaults. Env vars:
#   MOECERT_REPRO_OUT (runs/reproduce), MOECERT_REPRO_EPOCHS (4),
#   MOECERT_REPRO_TRAIN (0 = all 59,000 training images), MOECERT_REPRO_TEST (2000),
#   MOECERT_REPRO_ALPHA (0.8), MOECERT_REPRO_DOC (docs/results.md), MOECERT_BIN.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
MOECERT_WITH_PYTHON=1 "$root/scripts/deps.sh"
"$root/scripts/build.sh" --target moecert
bin="${MOECERT_BIN:-${MOECERT_BUILD_DIR:-$root/build}/moecert}"
out="${MOECERT_REPRO_OUT:-$root/runs/reproduce}"
epochs="${MOECERT_REPRO_EPOCHS:-4}"
train_n="${MOECERT_REPRO_TRAIN:-0}"
test_n="${MOECERT_REPRO_TEST:-2000}"
alpha="${MOECERT_REPRO_ALPHA:-0.8}"
doc="${MOECERT_REPRO_DOC:-$root/docs/results.md}"
mkdir -p "$out"
start=$(date +%s)

common=(--seed 0)
train_common=(--epochs "$epochs" --eps 0.1 --lr 1e-3 --schedule cosine --val-samples 1000
              --eval-steps 10 --log-every 200)
[[ "$train_n" != 0 ]] && common+=(--samples "$train_n")

train() {  # name, then train options
  local name=$1; shift
  if [[ -f "$out/$name/model.json" && -f "$out/$name.done" ]]; then
    echo "== $name: trained already ($out/$name)"; return
  fi
  echo "== train $name: $*"
  "$bin" "${common[@]}" train "${train_common[@]}" "$@" --out "$out/$name" --force \
    2> >(tee "$out/$name.log" >&2)
  touch "$out/$name.done"
}

attack() {  # name, checkpoint, then attack options
  local name=$1 ckpt=$2; shift 2
  if [[ -f "$out/attack-$name.json" ]]; then echo "== attack $name: done already"; return; fi
  echo "== attack $name: PGD-50 on $test_n test images"
  "$bin" --seed 0 --samples "$test_n" attack "$ckpt" --eps 0.1 --steps 50 \
    --json "$out/attack-$name.json" "$@"
}

moe=(--experts 4 --expert cnn-s --router linear --routing top-k --top-k 1)
train st     --method st     "${moe[@]}"
train at     --method at     "${moe[@]}"
train trades --method trades "${moe[@]}"
train rt-er  --method rt-er  "${moe[@]}"
train advmoe-moecnn --method advmoe --arch moe-cnn --experts 2 --scale 0.5
train at-moecnn     --method at     --arch moe-cnn --experts 2 --scale 0.5
train at-dense      --method at     --experts 1
train jtdmoe --method jtdmoe --alpha "$alpha" "${moe[@]}"

if [[ ! -f "$out/dual/model.json" ]]; then
  "$bin" dual --standard "$out/st" --robust "$out/rt-er" --alpha "$alpha" --out "$out/dual" --force
fi

for name in st at trades rt-er advmoe-moecnn at-moecnn at-dense jtdmoe; do
  attack "$name" "$out/$name"
done
attack dual "$out/dual" --alpha-sweep

elapsed=$(( $(date +%s) - start ))
python3 "$root/scripts/results_table.py" --dir "$out" --out "$doc" --elapsed "$elapsed" \
  --command "scripts/reproduce.sh  (MOECERT_REPRO_EPOCHS=$epochs MOECERT_REPRO_TRAIN=$train_n MOECERT_REPRO_TEST=$test_n MOECERT_REPRO_ALPHA=$alpha)"
echo
echo "study: $out ($(( elapsed / 60 )) min)"
echo "table: $doc"
