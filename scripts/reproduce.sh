#!/usr/bin/env bash
# Reproduction study (docs/study.md). On Fashion-MNIST, with the same budget for
# every method (cnn-s experts, E = 4, L-inf eps = 0.1, the same epochs, data and
# optimizer; healthy routers: top-2 router gradient and load balancing, the defaults),
# trains:
#   ST, AT, TRADES, RT-ER MoEs (model-level, top-1, linear router);
#   AT and RT-ER with paper 1's fixed random router (--router-train none);
#   AdvMoE on a MoE-CNN (N = 2, r = 0.5), AT on the same MoE-CNN, AT on the dense cnn-s;
#   JTDMoE (alpha = 0.8) from scratch;
# builds the dual-model ST + RT-ER (alpha = 0.8) and sweeps alpha = 0.5..1.0; retrains
# the claims' key rows (ST, AT, RT-ER, AdvMoE, AT MoE-CNN, JTDMoE, the dual) with a
# second seed; then evaluates every model on the test set:
#   PGD-50 (RA, RA-E, RA-R, expert usage) on MOECERT_REPRO_TEST images,
#   the standard suite (APGD-CE, APGD-T, FMN, Square, route/member-aware runs) and
#   PGD-50 again on MOECERT_REPRO_STANDARD images,
#   certify (every estimator, best sound form per sample) at eps 0.02 and 0.05 on the
#   first MOECERT_REPRO_CERTIFY test images (seed-0 rows; certify --samples N takes the
#   first N, attack a seeded subset: --subset random, a smaller one inside a larger);
# and writes the tables to docs/study.md (scripts/results_table.py).
# Every stage is skipped when its output exists: rerunning resumes the study.
# Budget: 70 min 20 s on 2 cores after the build with the defaults. Env vars:
#   MOECERT_REPRO_OUT (runs/reproduce), MOECERT_REPRO_EPOCHS (4),
#   MOECERT_REPRO_TRAIN (0 = all 59,000 training images), MOECERT_REPRO_TEST (2000),
#   MOECERT_REPRO_STANDARD (500), MOECERT_REPRO_CERTIFY (200), MOECERT_REPRO_SEEDS (2),
#   MOECERT_REPRO_ALPHA (0.8), MOECERT_REPRO_DOC (docs/study.md), MOECERT_BIN.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
MOECERT_WITH_PYTHON=1 "$root/scripts/deps.sh"
"$root/scripts/build.sh" --target moecert
bin="${MOECERT_BIN:-${MOECERT_BUILD_DIR:-$root/build}/moecert}"
out="${MOECERT_REPRO_OUT:-$root/runs/reproduce}"
epochs="${MOECERT_REPRO_EPOCHS:-4}"
train_n="${MOECERT_REPRO_TRAIN:-0}"
test_n="${MOECERT_REPRO_TEST:-2000}"
standard_n="${MOECERT_REPRO_STANDARD:-500}"
certify_n="${MOECERT_REPRO_CERTIFY:-200}"
seeds="${MOECERT_REPRO_SEEDS:-2}"
alpha="${MOECERT_REPRO_ALPHA:-0.8}"
doc="${MOECERT_REPRO_DOC:-$root/docs/study.md}"
mkdir -p "$out"
start=$(date +%s)

train_common=(--epochs "$epochs" --eps 0.1 --lr 1e-3 --schedule cosine --val-samples 1000
              --eval-steps 10 --log-every 200)
data=()
[[ "$train_n" != 0 ]] && data+=(--samples "$train_n")

train() {  # name, seed, then train options
  local name=$1 seed=$2; shift 2
  if [[ -f "$out/$name/model.json" && -f "$out/$name.done" ]]; then
    echo "== $name: trained already ($out/$name)"; return
  fi
  echo "== train $name (seed $seed): $*"
  "$bin" --seed "$seed" "${data[@]}" train "${train_common[@]}" "$@" --out "$out/$name" --force \
    2> >(tee "$out/$name.log" >&2)
  touch "$out/$name.done"
}

dual() {  # name, standard member, robust member
  [[ -f "$out/$1/model.json" ]] && return
  "$bin" dual --standard "$out/$2" --robust "$out/$3" --alpha "$alpha" --out "$out/$1" --force
}

evaluate() {  # name, certify (0/1), then extra PGD options
  local name=$1 cert=$2; shift 2
  local ckpt="$out/$name"
  if [[ ! -f "$out/attack-$name.json" ]]; then
    echo "== attack $name: PGD-50 on $test_n test images"
    "$bin" --seed 0 --samples "$test_n" --subset random attack "$ckpt" --suite pgd --eps 0.1 --steps 50 \
      --json "$out/attack-$name.json" -q "$@"
  fi
  if [[ "$standard_n" != 0 && ! -f "$out/standard-$name.json" ]]; then
    echo "== attack $name: standard suite on $standard_n test images"
    "$bin" --seed 0 --samples "$standard_n" --subset random attack "$ckpt" --suite standard --eps 0.1 \
      --no-components --json "$out/standard-$name.json" -q
  fi
  if [[ "$standard_n" != 0 && ! -f "$out/pgd-same-$name.json" ]]; then  # PGD-50 on the suite's images
    "$bin" --seed 0 --samples "$standard_n" --subset random attack "$ckpt" --suite pgd --eps 0.1 --steps 50 \
      --no-components --json "$out/pgd-same-$name.json" -q > /dev/null
  fi
  if [[ "$cert" == 1 && "$certify_n" != 0 && ! -f "$out/certify-$name/results.json" ]]; then
    echo "== certify $name: $certify_n test images, eps 0.02 and 0.05"
    "$bin" --samples "$certify_n" certify "$ckpt" --norm inf --estimator all \
      --eps-grid 0.02,0.05 --steps 20 --out "$out/certify-$name" -q
  fi
}

moe=(--experts 4 --expert cnn-s --router linear --routing top-k --top-k 1)
moecnn=(--arch moe-cnn --experts 2 --scale 0.5)

# Seed 0: every row.
train st               0 --method st     "${moe[@]}"
train at               0 --method at     "${moe[@]}"
train trades           0 --method trades "${moe[@]}"
train rt-er            0 --method rt-er  "${moe[@]}"
train at-fixed         0 --method at     "${moe[@]}" --router-train none
train rt-er-fixed      0 --method rt-er  "${moe[@]}" --router-train none
train advmoe-moecnn    0 --method advmoe "${moecnn[@]}"
train at-moecnn        0 --method at     "${moecnn[@]}"
train at-dense         0 --method at     --experts 1
train jtdmoe           0 --method jtdmoe --alpha "$alpha" "${moe[@]}"
dual dual st rt-er
for name in st at trades rt-er at-fixed rt-er-fixed advmoe-moecnn at-moecnn at-dense jtdmoe; do
  evaluate "$name" 1
done
evaluate dual 1 --alpha-sweep

# Further seeds: the rows the papers' claims compare.
for ((s = 1; s < seeds; ++s)); do
  train "st-s$s"            "$s" --method st     "${moe[@]}"
  train "at-s$s"            "$s" --method at     "${moe[@]}"
  train "rt-er-s$s"         "$s" --method rt-er  "${moe[@]}"
  train "advmoe-moecnn-s$s" "$s" --method advmoe "${moecnn[@]}"
  train "at-moecnn-s$s"     "$s" --method at     "${moecnn[@]}"
  train "jtdmoe-s$s"        "$s" --method jtdmoe --alpha "$alpha" "${moe[@]}"
  dual "dual-s$s" "st-s$s" "rt-er-s$s"
  for name in at rt-er advmoe-moecnn at-moecnn jtdmoe dual; do evaluate "$name-s$s" 0; done
done

elapsed=$(( $(date +%s) - start ))
python3 "$root/scripts/results_table.py" --dir "$out" --out "$doc" --elapsed "$elapsed" --seeds "$seeds" \
  --command "scripts/reproduce.sh  (MOECERT_REPRO_EPOCHS=$epochs MOECERT_REPRO_TRAIN=$train_n MOECERT_REPRO_TEST=$test_n MOECERT_REPRO_STANDARD=$standard_n MOECERT_REPRO_CERTIFY=$certify_n MOECERT_REPRO_SEEDS=$seeds MOECERT_REPRO_ALPHA=$alpha)"
echo
echo "study: $out ($(( elapsed / 60 )) min)"
echo "table: $doc"
