#!/usr/bin/env bash
# Compile-check every CUDA source under csrc/ with nvcc, without torch and without a GPU:
# the .cu files are torch-free by design (torch glue lives in the *_binding.cpp files), so
# nvcc alone can build them. One line per file; exits 1 after printing the compiler output
# of any file that fails. Skips (exit 0) when nvcc is absent.
#
#   tools/check_cuda.sh                              sm_80 and sm_90, -O3, as setup.py builds
#   SPARSEKERNELS_CUDA_ARCHS="75 80 90" tools/check_cuda.sh
#   SPARSEKERNELS_CUDA_WERROR=1 tools/check_cuda.sh  warnings are errors too
set -euo pipefail

cd "$(dirname "$0")/.."

NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: skipped (nvcc not found; set CUDA_HOME or put nvcc on PATH)"
  exit 0
fi

ARCHS="${SPARSEKERNELS_CUDA_ARCHS:-80 90}"
FLAGS=(-std=c++17 -O3 --use_fast_math -DSPARSEKERNELS_WITH_CUDA -Icsrc -Icsrc/cuda --threads 0)
for arch in $ARCHS; do
  FLAGS+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
if [[ "${SPARSEKERNELS_CUDA_WERROR:-0}" != "0" ]]; then
  FLAGS+=(-Werror all-warnings)
fi

mapfile -t FILES < <(find csrc -name '*.cu' | sort)
if [[ ${#FILES[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc/"
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
FAILED=0
for file in "${FILES[@]}"; do
  start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" -c "$file" -o "$TMP/out.o" >"$TMP/log" 2>&1; then
    warnings=$(grep -c "warning" "$TMP/log" || true)
    echo "ok    $file (nvcc $VERSION, sm_${ARCHS// /, sm_}, $((SECONDS - start))s, $warnings warnings)"
  else
    echo "FAIL  $file (nvcc $VERSION, sm_${ARCHS// /, sm_}, $((SECONDS - start))s):"
    sed 's/^/      /' "$TMP/log"
    FAILED=1
  fi
done
exit $FAILED
