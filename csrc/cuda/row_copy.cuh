// Byte-level row copies with the widest aligned vector access (16, 8, 4, 2 or 1 bytes).
// Data movement does not depend on the dtype, so the copy kernels take row sizes in bytes.
#pragma once

#include "common.cuh"

namespace hecate::cuda {

// Calls f(V{}) with V the widest unsigned type whose size divides row_bytes and every pointer.
template <typename F>
cudaError_t dispatch_row_vector(int64_t row_bytes, const void* a, const void* b, F&& f) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                         static_cast<uintptr_t>(row_bytes);
  if (bits % 16 == 0) return f(uint4{});
  if (bits % 8 == 0) return f(uint2{});
  if (bits % 4 == 0) return f(0u);
  if (bits % 2 == 0) return f(static_cast<unsigned short>(0));
  return f(static_cast<unsigned char>(0));
}

}  // namespace hecate::cuda
