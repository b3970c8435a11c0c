#!/usr/bin/env bash
# Applies the committed .clang-format to every C++ file; with --check, changes nothing
# and fails (exit 1) listing the files that differ (scripts/test.sh runs it so).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files '*.cpp' '*.h')
else
  mapfile -t files < <(find include src training certify reports tests bench -name '*.cpp' -o -name '*.h')
fi
if [[ "${1:-}" == "--check" ]]; then
  bad=()
  for f in "${files[@]}"; do
    [[ -f "$f" ]] || continue
    clang-format "$f" | cmp -s - "$f" || bad+=("$f")
  done
  if ((${#bad[@]})); then
    echo "moecert: ${#bad[@]} file(s) differ from .clang-format (run scripts/format.sh):" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
  fi
  echo "moecert: ${#files[@]} C++ files match .clang-format" >&2
else
  clang-format -i "${files[@]}"
fi
