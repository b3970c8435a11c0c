#!/usr/bin/env bash
# Installs what is missing, checks the formatting, builds, and runs the whole test
# suite through CTest. Extra arguments go to ctest (e.g. scripts/test.sh -L unit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
MOECERT_WITH_PYTORCH=1 MOECERT_WITH_BROWSER=1 MOECERT_WITH_FORMAT=1 "$root/scripts/deps.sh"
"$root/scripts/format.sh" --check
"$root/scripts/build.sh"
cd "${MOECERT_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "$(nproc)" --timeout 1200 "$@"
