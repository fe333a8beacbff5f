#!/usr/bin/env bash
# Compile-check of the CUDA sources without a GPU (CI and machines with a CPU-only torch):
#   1. nvcc -c every csrc/cuda/*.cu for sm_80 and sm_90 into a temporary directory, with the nvcc flags of
#      setup.py plus -fmad=false (the merge math must not be contracted to FMA);
#   2. a syntax check of csrc/cuda/bindings.cpp against torch's headers: a full one when torch has CUDA; with a
#      CPU-only torch, whose wheel ships c10/cuda headers but not the generated
#      c10/cuda/impl/cuda_cmake_macros.h, a stand-in check with a stub of that one generated header.
# Exits 0 (saying so) when nvcc is absent; any compile error fails the script with nvcc's / g++'s output.
# Environment: NVCC (compiler path), PYTHON (interpreter with torch), CXX (host compiler for step 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC or put it on PATH): CUDA compile check SKIPPED"
  exit 0
fi
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda: FAILED: NVCC=$NVCC is not an executable" >&2
  exit 1
fi
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pk_check_cuda.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

NVCC_FLAGS=(-O3 -std=c++17 -fmad=false -I csrc
            -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90)
echo "check_cuda: $("$NVCC" --version | tail -n 1) ($NVCC)"

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: FAILED: no csrc/cuda/*.cu files" >&2
  exit 1
fi
failed=0
for src in "${sources[@]}"; do
  obj="$TMP/$(basename "${src%.cu}").o"
  log="$TMP/$(basename "$src").log"
  start=$(date +%s.%N)
  if "$NVCC" "${NVCC_FLAGS[@]}" -c "$src" -o "$obj" >"$log" 2>&1; then
    printf 'check_cuda: OK      %-32s %6.1f s (sm_80 + sm_90)\n' "$src" "$(elapsed "$start")"
    if [[ -s "$log" ]]; then cat "$log"; fi  # warnings
  else
    printf 'check_cuda: FAILED  %-32s %6.1f s\n' "$src" "$(elapsed "$start")" >&2
    cat "$log" >&2
    failed=1
  fi
done

# ---- bindings.cpp ----------------------------------------------------------------------------------------
bindings=csrc/cuda/bindings.cpp
if [[ -f "$bindings" ]]; then
  if ! torch_info="$("$PYTHON" -c '
import os, torch
from torch.utils.cpp_extension import include_paths
print(torch.version.cuda or "")
print(" ".join(include_paths()))
print(os.path.isfile(os.path.join(include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")))
' 2>/dev/null)"; then
    echo "check_cuda: SKIPPED $bindings: '$PYTHON' cannot import torch"
  else
    torch_cuda="$(sed -n 1p <<<"$torch_info")"
    read -r -a torch_includes <<<"$(sed -n 2p <<<"$torch_info")"
    has_macros="$(sed -n 3p <<<"$torch_info")"
    # the CUDA root as nvcc itself sees it (nvcc may be a wrapper script or a symlink)
    cuda_root="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    if [[ -z "$cuda_root" ]]; then cuda_root="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"; fi
    cxx_flags=(-fsyntax-only -std=c++17 -DPYKERNELS_WITH_CUDA -I csrc)
    for inc in "${torch_includes[@]}"; do cxx_flags+=(-isystem "$inc"); done
    for inc in "$cuda_root/include" "$cuda_root/targets/x86_64-linux/include"; do
      if [[ -d "$inc" ]]; then cxx_flags+=(-isystem "$inc"); fi
    done
    mode=""
    if [[ -n "$torch_cuda" && "$has_macros" == "True" ]]; then
      mode="full check (torch built with CUDA $torch_cuda)"
    elif [[ -d "${torch_includes[0]}/c10/cuda" ]]; then
      echo "check_cuda: full check of $bindings SKIPPED: torch is CPU-only (torch.version.cuda is None), its" \
           "headers lack the generated c10/cuda/impl/cuda_cmake_macros.h"
      mkdir -p "$TMP/stub/c10/cuda/impl"
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
      cxx_flags=(-I "$TMP/stub" "${cxx_flags[@]}")
      mode="stand-in check (CPU torch headers + a stub of c10/cuda/impl/cuda_cmake_macros.h)"
    else
      echo "check_cuda: SKIPPED $bindings: torch is CPU-only and ships no c10/cuda headers"
    fi
    if [[ -n "$mode" ]]; then
      start=$(date +%s.%N)
      if "$CXX" "${cxx_flags[@]}" "$bindings" >"$TMP/bindings.log" 2>&1; then
        printf 'check_cuda: OK      %-32s %6.1f s (%s)\n' "$bindings" "$(elapsed "$start")" "$mode"
      else
        printf 'check_cuda: FAILED  %-32s %6.1f s (%s)\n' "$bindings" "$(elapsed "$start")" \
          "$mode" >&2
        cat "$TMP/bindings.log" >&2
        failed=1
      fi
    fi
  fi
fi

if [[ $failed -ne 0 ]]; then
  echo "check_cuda: FAILED (see the compiler output above)" >&2
  exit 1
fi
echo "check_cuda: all CUDA sources compile"
