#!/usr/bin/env bash
# CTest: a real report (tiny synthetic MoE and dual-model, certified, attacked, with an
# alpha-sweep) renders in headless Chromium with all six plots, no broken images and
# no script errors; scripts/check_report.py also takes a screenshot and checks that it
# is not blank. Exit 77 (skipped) when Chromium is not installed.
# Usage: chromium_check.sh MOECERT_BINARY REPO_ROOT
set -euo pipefail
bin=$1
root=$2
command -v chromium >/dev/null 2>&1 || { echo "chromium not installed: skipped"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=(--dataset synthetic --samples 600 --quiet)
# The tool with the test's thread count (CTest sets MOECERT_TEST_THREADS=1).
moecert() { "$bin" --threads "${MOECERT_TEST_THREADS:-0}" "$@"; }
moecert "${data[@]}" train --method at --experts 2 --epochs 2 --steps 2 --eps 0.03 --val-samples 64 \
  --eval-steps 1 --out "$tmp/robust"
moecert "${data[@]}" --seed 3 train --method st --experts 2 --epochs 2 --val-samples 64 --eval-steps 1 \
  --out "$tmp/standard"
moecert dual --standard "$tmp/standard" --robust "$tmp/robust" --alpha 0.8 --out "$tmp/dual"
moecert --dataset synthetic --samples 64 --quiet attack "$tmp/robust" --suite pgd --eps 0.03 --steps 2 --json "$tmp/robust.json"
moecert --dataset synthetic --samples 64 --quiet attack "$tmp/dual" --suite pgd --eps 0.03 --steps 2 --alpha-sweep \
  --json "$tmp/dual.json"
moecert --dataset synthetic --samples 16 --quiet certify "$tmp/robust" --estimator lipschitz,crown --steps 3 --eps-grid 0.001,0.01 \
  --out "$tmp/cert" --report "$tmp/report" --attack "$tmp/robust.json" --attack "$tmp/dual.json" \
  --gate "violations==0"
python3 "$root/scripts/check_report.py" "$tmp/report/report.html" --expect-plots 6 \
  --screenshot "$tmp/report/screenshot.png"
