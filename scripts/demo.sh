#!/usr/bin/env bash
# The main job on Fashion-MNIST: install what is missing, build, train an E = 4
# cnn-s MoE (top-1, linear router) certifiably (IBP over every expert the router can
# select on the eps-ball, a route-margin term that keeps the router's choice on the
# ball, the margins pushed past 6 logits for the dual-model), measure SA, RA,
# RA-E and RA-R of the whole test set at L-inf eps = 0.1 with PGD-20, blend it
# with a standardly trained MoE into a dual-model and sweep alpha, certify the
# first test images (every estimator: CROWN, alpha-CROWN, IBP and the Lipschitz
# theorems; FMN + APGD-bisection cross-check), attack with PGD-20 and the standard
# suite, and write the HTML report.
# Budget: about 10 minutes on 2 cores after the build. Override with env vars:
#   MOECERT_DEMO_EPOCHS (default 15), MOECERT_DEMO_OUT (default runs/demo),
#   MOECERT_DEMO_CERTIFY (test images certified, default 200),
#   MOECERT_DEMO_SWEEP (test images of the alpha-sweep, default 1000),
#   MOECERT_DEMO_SUITE (test images of the standard attack suite, default 1000).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh"
"$root/scripts/build.sh" --target moecert
bin="${MOECERT_BUILD_DIR:-$root/build}/moecert"
out="${MOECERT_DEMO_OUT:-$root/runs/demo}"
epochs="${MOECERT_DEMO_EPOCHS:-15}"
certify_n="${MOECERT_DEMO_CERTIFY:-200}"
sweep_n="${MOECERT_DEMO_SWEEP:-1000}"
suite_n="${MOECERT_DEMO_SUITE:-1000}"
mkdir -p "$out"

echo "== train: ibp (certified training: eps ramp 0 -> 0.11, kappa 1 -> 0.8, route margin 0.5, margin target 6), E=4 cnn-s experts, top-1 linear router (top-2 router gradient, load balancing 0.3), $epochs epochs (progress on stderr)"
"$bin" train --method ibp --experts 4 --expert cnn-s --router linear --routing top-k --top-k 1 \
  --epochs "$epochs" --eps 0.1 --train-eps 0.11 --kappa-end 0.8 --route-margin 0.5 --cert-margin 6 \
  --lr 1e-3 --schedule cosine --out "$out/checkpoint" --force --log-every 100

echo "== attack: test set, L-inf eps=0.1, PGD-20; routing health gates: no expert above 50 % or below 10 % of the test samples"
"$bin" attack "$out/checkpoint" --suite pgd --eps 0.1 --steps 20 --json "$out/attack.json" \
  --max-expert-share 0.5 --min-expert-share 0.1
echo "== attack: $suite_n test images (the first ones, as --samples takes them), the standard suite (APGD-CE, APGD-T, FMN, route-aware, Square)"
"$bin" --samples "$suite_n" attack "$out/checkpoint" --suite standard --eps 0.1 --no-components \
  --json "$out/attack-standard.json"

echo "== dual-model: a standardly trained MoE (3 epochs) blended with it, alpha = 0.8; alpha-sweep on the first $sweep_n test images"
"$bin" train --method st --experts 4 --expert cnn-s --router linear --routing top-k --top-k 1 \
  --epochs 3 --lr 1e-3 --schedule cosine --out "$out/standard" --force --log-every 100
"$bin" dual --standard "$out/standard" --robust "$out/checkpoint" --alpha 0.8 --out "$out/dual" --force
"$bin" --samples "$sweep_n" attack "$out/dual" --suite pgd --eps 0.1 --steps 20 --alpha-sweep --json "$out/dual-attack.json"

echo "== certify: first $certify_n test images, L-inf ball ∩ [0,1], every estimator, FMN + APGD-20 bisection cross-check"
"$bin" --samples "$certify_n" certify "$out/checkpoint" --norm inf --estimator all \
  --eps-grid 0.01,0.02,0.05,0.1 --steps 20 --out "$out/certify" \
  --report "$out/report" --attack "$out/attack.json" --attack "$out/attack-standard.json" --attack "$out/dual-attack.json" \
  --gate "violations==0" --junit "$out/report/junit.xml"

echo
echo "checkpoint: $out/checkpoint"
echo "attack:     $out/attack.json, standard suite: $out/attack-standard.json (dual-model alpha-sweep: $out/dual-attack.json)"
echo "results:    $out/certify/results.json"
echo "report:     $out/report/report.html"
