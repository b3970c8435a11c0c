#!/usr/bin/env bash
# The CUDA variant, checked on a GPU machine that has a CUDA PyTorch install but not
# Debian's packages: builds moecert against that PyTorch's LibTorch with the headers
# of devdeps/ (made beforehand by scripts/cuda_deps.py), then trains, attacks and
# certifies on cuda and on cpu and prints the timings side by side.
# Writes its log and results under $OUT (default /tmp/cuda-check).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/cuda-check}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
cd "$root"
deps=$root/devdeps
[[ -d $deps/include ]] || { echo "no devdeps/: run scripts/cuda_deps.py on a Debian machine first"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
echo "cmake $(cmake --version | head -1), g++ $(g++ -dumpfullversion), nvcc $($nvcc --version | tail -1)"

t0=$(date +%s)
if ! cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DMOECERT_TESTS=OFF -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_INCLUDE_PATH="$deps/include" -DZLIB_ROOT="$deps" -DCMAKE_CUDA_COMPILER="$nvcc" \
    >"$out/cmake.txt" 2>&1; then
  tail -60 "$out/cmake.txt"; exit 1
fi
if ! cmake --build build-cuda -j "$(nproc)" --target moecert bench_certify >"$out/build.txt" 2>&1; then
  grep -E "error" -A6 "$out/build.txt" | head -120; exit 1
fi
echo "== built in $(($(date +%s) - t0)) s"

bin=build-cuda/moecert
data=(--dataset fashion-mnist --data "$deps/data/fashion-mnist")
timed() {  # label, command...
  local label=$1; shift
  local s=$(date +%s%N)
  "$@" >"$out/$label.txt" 2>&1
  local rc=$?
  printf '%-24s rc=%d %8d ms\n' "$label" "$rc" $((($(date +%s%N) - s) / 1000000))
  tail -3 "$out/$label.txt" | sed 's/^/    /'
}
for dev in cuda cpu; do
  timed "train-at-$dev" "$bin" --device "$dev" "${data[@]}" --samples 20000 train --method at --experts 4 \
    --epochs 1 --eps 0.1 --steps 5 --val-samples 500 --eval-steps 5 --out "$out/ckpt-$dev" --log-every 50
  timed "attack-$dev" "$bin" --device "$dev" "${data[@]}" --samples 2000 attack "$out/ckpt-cuda" --eps 0.1 \
    --steps 20 --json "$out/attack-$dev.json"
  timed "certify-$dev" "$bin" --device "$dev" "${data[@]}" --samples 200 certify "$out/ckpt-cuda" \
    --steps 20 --eps-grid 0.005,0.01,0.02 --out "$out/cert-$dev"
done
python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
a, b = (json.load(open("%s/cert-%s/results.json" % (out, d))) for d in ("cuda", "cpu"))
worst = 0.0
for ra, rb in zip(a["rows"], b["rows"]):
    for k, v in ra["radii"].items():
        worst = max(worst, abs(v - rb["radii"][k]))
print("certify cuda vs cpu: violations %d / %d, largest radius difference %.3g" %
      (len(a["aggregates"]["violations"]), len(b["aggregates"]["violations"]), worst))
EOF
timed "bench-certify-resnet" build-cuda/bench_certify --samples 50 --out "$out/bench_certify.json"
