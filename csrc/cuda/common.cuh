// Device helpers shared by the hecate CUDA kernels: dtype traits, vector types,
// warp/block reductions and the dtype dispatch. CUDA headers only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace hecate::cuda {

constexpr int kWarp = 32;

// Accumulation ("math") type, as at::opmath_type: fp32 for fp16 / bf16 / fp32, the type
// itself for fp64 and the integer types.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ T to_acc(T v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements loaded / stored as one aligned access (N * sizeof(T) is 16 bytes or less).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Largest element count per vector (at most 8 elements and 16 bytes) that divides the row
// length and keeps every row start aligned, given the base pointers' alignment.
template <typename T>
inline int vec_width(int64_t row_len, const void* const* ptrs, int num_ptrs) {
  constexpr int kMax = 16 / sizeof(T) < 8 ? static_cast<int>(16 / sizeof(T)) : 8;
  for (int n = kMax; n > 1; n /= 2) {
    const uintptr_t bytes = static_cast<uintptr_t>(n) * sizeof(T);
    bool ok = row_len % n == 0;
    for (int i = 0; ok && i < num_ptrs; ++i) ok = reinterpret_cast<uintptr_t>(ptrs[i]) % bytes == 0;
    if (ok) return n;
  }
  return 1;
}

// Runs launch(std::integral_constant<int, N>{}) with the widest vector width N (elements)
// that divides the row length and the alignment of every pointer.
template <typename T, typename F>
cudaError_t dispatch_vec(int64_t row_len, const void* const* ptrs, int num_ptrs, F&& launch) {
  const int width = vec_width<T>(row_len, ptrs, num_ptrs);
  if constexpr (sizeof(T) <= 2) {
    if (width == 8) return launch(std::integral_constant<int, 8>{});
  }
  if constexpr (sizeof(T) <= 4) {
    if (width == 4) return launch(std::integral_constant<int, 4>{});
  }
  if (width == 2) return launch(std::integral_constant<int, 2>{});
  return launch(std::integral_constant<int, 1>{});
}

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 values.
// Contains __syncthreads: every thread of the block must call it.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : T(0);
  return warp_sum(v);
}

// Threads per block for rows of `row_vecs` vectors: one warp at least, 256 at most.
inline int row_threads(int64_t row_vecs) {
  int64_t threads = (row_vecs + kWarp - 1) / kWarp * kWarp;
  if (threads < kWarp) threads = kWarp;
  if (threads > 256) threads = 256;
  return static_cast<int>(threads);
}

inline unsigned grid_for(int64_t work, int per_block, int64_t max_blocks = 1 << 20) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace hecate::cuda

// Runs the lambda `__VA_ARGS__` with `scalar_t` bound to the C++ type of a float hecate_dtype.
#define HECATE_DISPATCH_FLOAT(dtype, ...)                                          \
  [&]() -> cudaError_t {                                                           \
    switch (dtype) {                                                               \
      case HECATE_F32: { using scalar_t = float; return __VA_ARGS__(); }           \
      case HECATE_F16: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case HECATE_BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }  \
      case HECATE_F64: { using scalar_t = double; return __VA_ARGS__(); }          \
      default: return cudaErrorInvalidValue;                                       \
    }                                                                              \
  }()

// The same over every hecate_dtype (floats and integers).
#define HECATE_DISPATCH_ALL(dtype, ...)                                            \
  [&]() -> cudaError_t {                                                           \
    switch (dtype) {                                                               \
      case HECATE_U8: { using scalar_t = uint8_t; return __VA_ARGS__(); }          \
      case HECATE_I8: { using scalar_t = int8_t; return __VA_ARGS__(); }           \
      case HECATE_I16: { using scalar_t = int16_t; return __VA_ARGS__(); }         \
      case HECATE_I32: { using scalar_t = int32_t; return __VA_ARGS__(); }         \
      case HECATE_I64: { using scalar_t = int64_t; return __VA_ARGS__(); }         \
      default: return HECATE_DISPATCH_FLOAT(dtype, __VA_ARGS__);                   \
    }                                                                              \
  }()
