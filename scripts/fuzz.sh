#!/usr/bin/env bash
# Fuzzes moecert's readers with libFuzzer under AddressSanitizer and UBSan: the gate
# parser, results.json, IDX and CIFAR-10 data files, the checkpoint manifest, the
# weights archive, torch.save files, ONNX models, VNNLIB properties, graph-component
# structures and import's assembly files. Builds build-fuzz/ with clang, then runs each harness for SECONDS
# (default 60) from the committed corpus (tests/fuzz/corpus/<target>), growing a work
# corpus in build-fuzz/corpus/<target>. A crash leaves its input in build-fuzz/crashes/:
# add it to tests/fuzz/corpus/<target>/ (the suite replays every file there) and fix it.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   (targets: gate results idx cifar manifest weights torchfile onnx vnnlib graph assembly)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(gate results idx cifar manifest weights torchfile onnx vnnlib graph assembly)
MOECERT_FUZZ_PACKAGES=1 "$root/scripts/deps.sh"
build="${MOECERT_FUZZ_BUILD_DIR:-$root/build-fuzz}"
cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOECERT_FUZZ=ON -DMOECERT_TESTS=OFF >/dev/null
cmake --build "$build" -j "${MOECERT_JOBS:-$(nproc)}" --target "${targets[@]/#/fuzz_}"
mkdir -p "$build/crashes"
status=0
for t in "${targets[@]}"; do
  mkdir -p "$build/corpus/$t"
  echo "== fuzz_$t for ${seconds}s" >&2
  # rss_limit: a refused input must stay small; detect_leaks=0: LibTorch keeps caches.
  if ! ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0 UBSAN_OPTIONS=print_stacktrace=1 \
      "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
      -artifact_prefix="$build/crashes/$t-" -print_final_stats=1 \
      "$build/corpus/$t" "$root/tests/fuzz/corpus/$t" 2>"$build/fuzz_$t.log"; then
    status=1
    echo "fuzz_$t: FAILED (see $build/fuzz_$t.log and $build/crashes/)" >&2
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$build/fuzz_$t.log" | sed "s/^/fuzz_$t /" >&2 || true
done
exit $status
