#!/usr/bin/env bash
# Installs the Debian packages moecert needs, if any is missing. Sourced by
# demo.sh and test.sh; safe to run repeatedly (does nothing when all are there).
set -euo pipefail

MOECERT_PACKAGES=(
  build-essential cmake ccache pkg-config
  libtorch-dev libopenblas0-openmp   # LibTorch + an optimised BLAS (reference BLAS is ~17x slower)
  libgoogle-perftools-dev            # tcmalloc: an allocator that keeps freed memory (certification 1.5x faster)
  libeigen3-dev libboost-dev libcli11-dev catch2 nlohmann-json3-dev zlib1g-dev
  libjpeg62-turbo-dev                # TinyImageNet's JPEGs (libjpeg-turbo)
  libonnx-dev                        # ONNX models (import, verify)
  libgloo-dev                        # c10d's Gloo headers: data-parallel training
  dataset-fashion-mnist gnuplot-nox
)
if [[ "${MOECERT_WITH_PYTHON:-0}" == 1 ]]; then
  MOECERT_PACKAGES+=(python3)         # scripts/results_table.py (the reproduction study's table)
fi
if [[ "${MOECERT_WITH_BROWSER:-0}" == 1 ]]; then
  MOECERT_PACKAGES+=(python3 chromium) # the headless-Chromium check of report.html
fi
if [[ "${MOECERT_FUZZ_PACKAGES:-0}" == 1 ]]; then
  MOECERT_PACKAGES+=(clang libclang-rt-dev) # scripts/fuzz.sh: libFuzzer, ASan, UBSan
fi
if [[ "${MOECERT_WITH_FORMAT:-0}" == 1 ]]; then
  MOECERT_PACKAGES+=(clang-format)       # scripts/test.sh checks the committed .clang-format
fi
if [[ "${MOECERT_WITH_PYTORCH:-0}" == 1 ]]; then
  MOECERT_PACKAGES+=(python3-torch)   # for the torch.jit.load interoperability test and the peer
fi

missing=()
for p in "${MOECERT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "moecert: installing missing packages: ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# LibTorch calls whatever libblas.so.3 is active: make sure it is OpenBLAS.
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
if [[ "$blas" != *openblas* ]]; then
  cand=$(update-alternatives --list libblas.so.3-x86_64-linux-gnu 2>/dev/null | grep openblas | head -n 1 || true)
  if [[ -n "$cand" ]]; then
    ${SUDO:-} update-alternatives --set libblas.so.3-x86_64-linux-gnu "$cand" >&2 || true
  fi
fi
