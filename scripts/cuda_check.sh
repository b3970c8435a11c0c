#!/usr/bin/env bash
# The CUDA variant, checked on a GPU machine that has a CUDA PyTorch install but not
# Debian's packages: builds moecert against that PyTorch's LibTorch with the headers
# of devdeps/ (made beforehand by scripts/cuda_deps.py), then trains, attacks and
# certifies on cuda and on cpu and prints the timings side by side; then certified
# training (ibp, crown-ibp, soft and top-2 routing through the mixture bound, MoE-CNN,
# jtdmoe with an ibp robust step, resume mid-ramp) and certification of a certified-
# trained checkpoint (devdeps/ckpt/ibp_b when present: full test set on cuda, first
# 2,000 on cpu); then a few epochs of RT-ER / AdvMoE on the papers' CIFAR backbones
# (ResNet-18 MoE, WRN and VGG MoE-CNNs) with their images/s. Writes log.txt and a few JSON files under $OUT (default: a new
# temporary directory), the rest under $WORK (default: another).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$(mktemp -d)}
work=${WORK:-$(mktemp -d)}
mkdir -p "$out" "$work"
exec > >(tee "$out/log.txt") 2>&1
cd "$root"
deps=$root/devdeps
[[ -d $deps/include ]] || { echo "no devdeps/: run scripts/cuda_deps.py on a Debian machine first"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
echo "cmake $(cmake --version | head -1), g++ $(g++ -dumpfullversion), nvcc $($nvcc --version | tail -1)"

# NCCL's header ships with a CUDA PyTorch's wheels (nvidia-nccl-*): with it the build
# gets --dist-backend nccl; a build that fails with it is redone without.
nccl_inc=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null)
nccl=OFF
[[ -n $nccl_inc && -f $nccl_inc/nccl.h ]] && nccl=ON
t0=$(date +%s)
build_cuda() {  # MOECERT_NCCL value
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DMOECERT_TESTS=OFF -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_INCLUDE_PATH="$deps/include;${nccl_inc:-$deps/include}" -DZLIB_ROOT="$deps" \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DMOECERT_NCCL="$1" >"$work/cmake.txt" 2>&1 || { tail -60 "$work/cmake.txt"; return 1; }
  cmake --build build-cuda -j "$(nproc)" --target moecert bench_certify >"$work/build.txt" 2>&1 \
    || { grep -E "error" -A6 "$work/build.txt" | head -120; return 1; }
}
if ! build_cuda "$nccl"; then
  [[ $nccl == ON ]] || exit 1
  echo "== the build with NCCL failed (above); building without it"
  nccl=OFF
  build_cuda OFF || exit 1
fi
echo "== built in $(($(date +%s) - t0)) s (NCCL $nccl)"

bin=build-cuda/moecert
data=(--dataset fashion-mnist --data "$deps/data/fashion-mnist")
timed() {  # label, command...
  local label=$1; shift
  local s=$(date +%s%N)
  "$@" >"$work/$label.txt" 2>&1
  local rc=$?
  printf '%-24s rc=%d %8d ms\n' "$label" "$rc" $((($(date +%s%N) - s) / 1000000))
  grep -E " eta " "$work/$label.txt" | tail -1 | cut -c1-220 | sed 's/^/    /'  # the last progress line
  tail -3 "$work/$label.txt" | cut -c1-220 | sed 's/^/    /'
}
compare_certs() {  # label, results.json A, results.json B: rows compared in order
  python3 - "$@" <<'PYEOF'
import json, os, sys
label, pa, pb = sys.argv[1:4]
if not (os.path.exists(pa) and os.path.exists(pb)):
    sys.exit(print(label + ": missing results"))
a, b = json.load(open(pa)), json.load(open(pb))
worst, n = 0.0, 0
for ra, rb in zip(a["rows"], b["rows"]):
    n += 1
    for k, v in ra["radii"].items():
        if v is not None and rb["radii"].get(k) is not None:
            worst = max(worst, abs(v - rb["radii"][k]))
print("%s: %d rows compared, violations %d / %d, largest radius difference %.3g" %
      (label, n, len(a["aggregates"]["violations"]), len(b["aggregates"]["violations"]), worst))
for name, r in (("A", a), ("B", b)):
    print("   ", name, json.dumps({k: v for k, v in r["aggregates"].items() if k != "violations"})[:700])
PYEOF
}
for dev in cuda cpu; do
  timed "train-at-$dev" "$bin" --device "$dev" "${data[@]}" --samples 20000 train --method at --experts 4 \
    --epochs 1 --eps 0.1 --steps 5 --val-samples 500 --eval-steps 5 --out "$work/ckpt-$dev" --log-every 50
  timed "attack-$dev" "$bin" --device "$dev" "${data[@]}" --samples 2000 attack "$work/ckpt-cuda" --eps 0.1 \
    --steps 20 --json "$work/attack-$dev.json"
  timed "certify-$dev" "$bin" --device "$dev" "${data[@]}" --samples 200 certify "$work/ckpt-cuda" \
    --steps 20 --eps-grid 0.005,0.01,0.02 --out "$work/cert-$dev"
done
compare_certs "certify cuda (A) vs cpu (B)" "$work/cert-cuda/results.json" "$work/cert-cpu/results.json"
# One GPU through a process group of one (torchrun --nproc_per_node=1's variables):
# every collective runs; its time against train-at-cuda above is the group's overhead.
if [[ $nccl == ON ]]; then
  WORLD_SIZE=1 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 timed "train-at-cuda-nccl1" "$bin" --device cuda \
    "${data[@]}" --samples 20000 train --method at --experts 4 --epochs 1 --eps 0.1 --steps 5 --val-samples 500 \
    --eval-steps 5 --out "$work/ckpt-nccl1" --log-every 50 --dist-backend nccl
fi
timed "bench-certify-resnet" build-cuda/bench_certify --samples 50 --out "$work/bench_certify.json"

# --- certified training on cuda and cpu ---------------------------------------------
ct=(train --eps 0.1 --lr 1e-3 --val-samples 500 --eval-steps 5 --log-every 50)
for dev in cuda cpu; do
  timed "ibp-$dev" "$bin" --device "$dev" "${data[@]}" --samples 20000 "${ct[@]}" --experts 4 --method ibp \
    --epochs 2 --eps-warmup 0.25 --eps-ramp 1 --route-margin 0.5 --cert-margin 6 --out "$work/ibp-$dev"
done
timed "crown-ibp-cuda" "$bin" --device cuda "${data[@]}" --samples 10000 "${ct[@]}" --experts 4 --method crown-ibp \
  --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --route-margin 0.5 --out "$work/cibp-cuda"
timed "crown-ibp-cpu" "$bin" --device cpu "${data[@]}" --samples 3000 "${ct[@]}" --experts 4 --method crown-ibp \
  --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --route-margin 0.5 --out "$work/cibp-cpu"
timed "ibp-soft-cuda" "$bin" --device cuda "${data[@]}" --samples 10000 "${ct[@]}" --experts 4 --method ibp \
  --routing soft --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --out "$work/ibp-soft"
timed "ibp-top2-cuda" "$bin" --device cuda "${data[@]}" --samples 10000 "${ct[@]}" --experts 4 --method ibp \
  --top-k 2 --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --out "$work/ibp-top2"
timed "ibp-moecnn-cuda" "$bin" --device cuda "${data[@]}" --samples 10000 "${ct[@]}" --experts 2 --method ibp \
  --arch moe-cnn --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --out "$work/ibp-moecnn"
timed "jtdmoe-ibp-cuda" "$bin" --device cuda "${data[@]}" --samples 10000 "${ct[@]}" --experts 4 --method jtdmoe \
  --jtd-robust ibp --epochs 1 --eps-warmup 0.1 --eps-ramp 0.9 --out "$work/jtd-ibp"
# resume mid-ramp on cuda: a 2-epoch run (constant lr, ramp over epochs 2-3) resumed to 4
rr=(--device cuda "${data[@]}" --samples 4000 "${ct[@]}" --experts 4 --method ibp --schedule constant --eps-warmup 1
    --eps-ramp 2 --route-margin 0.5)
timed "resume-full-cuda" "$bin" "${rr[@]}" --epochs 4 --out "$work/res-full"
timed "resume-part-cuda" "$bin" "${rr[@]}" --epochs 2 --out "$work/res-part"
timed "resume-rest-cuda" "$bin" "${rr[@]}" --epochs 4 --out "$work/res-part" --resume
python3 - "$work" <<'PYEOF'
import sys, torch
w = sys.argv[1]
try:
    la = torch.jit.load(w + "/res-full/weights.pt", map_location="cpu")
    lb = torch.jit.load(w + "/res-part/weights.pt", map_location="cpu")
    pa, pb = dict(la.named_parameters()), dict(lb.named_parameters())
    diff = max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa)
    print("resume mid-ramp on cuda: %d tensors, largest weight difference vs uninterrupted %.3g" % (len(pa), diff))
except Exception as e:
    print("resume comparison: could not read weights.pt with python:", repr(e)[:300])
PYEOF
cmp -s "$work/res-full/weights.pt" "$work/res-part/weights.pt" && echo "resume mid-ramp on cuda: weights.pt byte-identical" \
  || echo "resume mid-ramp on cuda: weights.pt differs"

# --- certify the certified-trained checkpoints: cuda vs cpu ---------------------------
for dev in cuda cpu; do
  timed "certify-ibp-$dev" "$bin" --device "$dev" "${data[@]}" --samples 200 certify "$work/ibp-cuda" \
    --estimator ibp,crown,alpha-crown --steps 20 --eps-grid 0.01,0.05,0.1 --out "$work/certibp-$dev"
done
if [[ -d $deps/ckpt/ibp_b ]]; then
  timed "certify-full-cuda" "$bin" --device cuda "${data[@]}" certify "$deps/ckpt/ibp_b" \
    --estimator ibp,crown --no-empirical --out "$work/certfull-cuda"
  timed "certify-2000-cpu" "$bin" --device cpu "${data[@]}" --samples 2000 certify "$deps/ckpt/ibp_b" \
    --estimator ibp,crown --no-empirical --out "$work/certfull-cpu"
  cp "$work/certfull-cuda/results.json" "$out/certfull-cuda.json" 2>/dev/null
fi
compare_certs "certify ibp-trained (cuda ckpt), cuda (A) vs cpu (B)" "$work/certibp-cuda/results.json" \
  "$work/certibp-cpu/results.json"
compare_certs "certify ibp_b, full set on cuda (A) vs first 2000 on cpu (B)" "$work/certfull-cuda/results.json" \
  "$work/certfull-cpu/results.json"

# --- the papers' backbones on the device: paper 1's RT-ER on a ResNet-18 MoE and paper 2's
# AdvMoE on WRN / VGG MoE-CNNs, CIFAR-10-shaped data (synthetic-cifar), crop + flip; the
# last progress line of each shows images/s ----------------------------------------------
cifar=(--device cuda --dataset synthetic-cifar)
timed "rter-resnet18-cuda" "$bin" "${cifar[@]}" train --method rt-er --expert resnet18 --experts 4 \
  --epochs 3 --crop-pad 4 --flip --val-samples 200 --eval-steps 5 --log-every 5 --out "$work/r18"
timed "advmoe-wrn-16-4-cuda" "$bin" "${cifar[@]}" train --arch moe-cnn --method advmoe --expert wrn-16-4 \
  --router resnet20 --epochs 3 --crop-pad 4 --flip --val-samples 200 --eval-steps 5 --log-every 5 --out "$work/wrn"
timed "advmoe-vgg16-cuda" "$bin" "${cifar[@]}" train --arch moe-cnn --method advmoe --expert vgg16-bn \
  --router resnet20 --epochs 3 --crop-pad 4 --flip --val-samples 200 --eval-steps 5 --log-every 5 --out "$work/vgg"
echo "== done in $(($(date +%s) - t0)) s"
