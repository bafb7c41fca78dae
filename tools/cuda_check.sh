#!/usr/bin/env bash
# Compile-check the CUDA side of hecate._C on a machine without a GPU (run by `make cuda-check`).
#
#  1. every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (the .cu files include only CUDA
#     headers, so a CPU-only torch does not matter), warnings are errors;
#  2. every launcher declared in csrc/cuda/kernels.h is defined by some object;
#  3. csrc/cuda/cuda_ops.cpp (the torch wrapper) is syntax-checked against the installed torch
#     headers plus the CUDA include dir, when torch is importable.
# Exits 0 with "skipped" when nvcc is absent, non-zero on any error. See docs/build.md.
#
# Environment: NVCC (compiler path), PYTHON (for torch's include dirs), CXX, JOBS (parallel
# compiles, default 2).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "cuda-check skipped: nvcc not found (install a CUDA toolkit or set NVCC / CUDA_HOME)"
  exit 0
fi
# The toolkit's include dir, for the wrapper check (nvcc may be a wrapper script elsewhere).
CUDA_INC=""
for dir in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" \
           $("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p') \
           /usr/local/cuda/include; do
  if [[ -f "$dir/cuda_runtime.h" ]]; then CUDA_INC=$dir; break; fi
done
JOBS=${JOBS:-2}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "cuda-check: $("$NVCC" --version | tail -n 2 | head -n 1)"

# The C-interface split is what lets this script work: .cu files must not include torch.
if grep -nE '#include *[<"](torch|ATen|c10)/' csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/kernels.h; then
  echo "cuda-check FAILED: the lines above include torch headers in a CUDA kernel file;" \
       "keep torch in csrc/cuda/cuda_ops.cpp"
  exit 1
fi

# setup.py's nvcc flags plus those torch's BuildExtension adds (COMMON_NVCC_FLAGS, -fPIC), so
# that code relying on implicit half / bf16 conversions fails here as it would there.
NVCC_FLAGS=(-std=c++20 -O3 --expt-relaxed-constexpr -Icsrc -Icsrc/cuda -Werror all-warnings
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler=-fPIC
            -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90)

compile() {  # compile <file.cu>: object and log in $TMP
  local src=$1 name
  name=$(basename "$src" .cu)
  if "$NVCC" "${NVCC_FLAGS[@]}" -c "$src" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1; then
    echo "  ok      $src (sm_80, sm_90)"
  else
    echo "  FAILED  $src"
    sed 's/^/    /' "$TMP/$name.log"
    return 1
  fi
}

wrapper_check() {  # syntax-check the torch wrapper against the installed torch headers
  local py=${PYTHON:-}
  [[ -z "$py" && -x "$ROOT/.venv/bin/python" ]] && py="$ROOT/.venv/bin/python"
  py=${py:-python3}
  local includes
  local query='from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))'
  if ! includes=$("$py" -c "$query" 2>/dev/null); then
    echo "  skipped csrc/cuda/cuda_ops.cpp: torch is not importable with $py"
    return 0
  fi
  local flags=(-std=c++20 -fsyntax-only -Wall -Werror -Icsrc -Icsrc/cuda -I"$CUDA_INC")
  for inc in $includes; do flags+=(-I"$inc"); done
  # A CPU torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; c10 lets a
  # build skip it with this macro (it only sets C10_CUDA_BUILD_SHARED_LIBS, unused on Linux).
  flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  if "${CXX:-g++}" "${flags[@]}" csrc/cuda/cuda_ops.cpp >"$TMP/cuda_ops.log" 2>&1; then
    local version
    version=$("$py" -c 'import torch; print(torch.__version__)')
    echo "  ok      csrc/cuda/cuda_ops.cpp (syntax, torch $version)"
  else
    echo "  FAILED  csrc/cuda/cuda_ops.cpp"
    sed 's/^/    /' "$TMP/cuda_ops.log"
    return 1
  fi
}

status=0
wrapper_check >"$TMP/wrapper.out" 2>&1 &
wrapper_pid=$!
export -f compile
export NVCC TMP
export NVCC_FLAGS_STR="${NVCC_FLAGS[*]}"
# xargs runs the compiles JOBS at a time; each prints its own result block.
if ! printf '%s\n' csrc/cuda/*.cu |
     xargs -P "$JOBS" -I{} bash -c 'NVCC_FLAGS=($NVCC_FLAGS_STR); compile "$1"' _ {}; then
  status=1
fi
wait "$wrapper_pid" || status=1
cat "$TMP/wrapper.out"

# Every launcher of kernels.h must be defined (a missing one would only show as an import
# error of hecate._C on a GPU machine).
if [[ $status -eq 0 ]]; then
  declared=$(grep -oE '^(cudaError_t|size_t) +hecate_[a-z_]+' csrc/cuda/kernels.h |
             awk '{print $2}' | sort -u)
  defined=$(nm -g --defined-only "$TMP"/*.o | awk '{print $3}' | grep '^hecate_' | sort -u)
  missing=$(comm -23 <(echo "$declared") <(echo "$defined"))
  if [[ -n "$missing" ]]; then
    echo "  FAILED  launchers declared in kernels.h but defined nowhere: $missing"
    status=1
  else
    echo "  ok      all $(echo "$declared" | wc -l) launchers of kernels.h are defined"
  fi
fi

if [[ $status -eq 0 ]]; then echo "cuda-check passed"; else echo "cuda-check FAILED"; fi
exit $status
