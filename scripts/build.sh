#!/usr/bin/env bash
# Configures and builds moecert (Release) into build/. Used by demo.sh and test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${MOECERT_BUILD_DIR:-$root/build}"
jobs="${MOECERT_JOBS:-$(nproc)}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs" "$@"
