// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace hecate::cpu {

// fp32 math for every float dtype, fp64 for fp64 (so that gradcheck can run in double).
inline at::ScalarType math_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// parallel_for grain (in rows) giving each task about `bytes` of work.
inline int64_t rows_grain(int64_t row_bytes, int64_t bytes = 64 * 1024) {
  return std::max<int64_t>(1, bytes / std::max<int64_t>(1, row_bytes));
}

}  // namespace hecate::cpu
