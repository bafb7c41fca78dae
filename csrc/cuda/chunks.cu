// Chunk row copies of the sparse collectives: pack (gather into a send buffer), unpack
// (scatter received chunks into place) and scatter_add (accumulate received gradients).
//
// unpack and scatter_add give each thread one column (vector) of the chunk and walk the
// received rows i = 0..n-1 in order, so repeated chunk ids are handled without atomics and
// deterministically: unpack keeps the last copy, scatter_add adds in order of i exactly like
// the CPU kernel. Chunks are expert parameter buffers (S is large), so the columns give
// plenty of parallelism.
//
// Chunk ids outside [0, C), which the CPU op rejects with a ValueError, are never copied (no
// out-of-bounds access): one thread per bad row fails a device-side assert, which stops the
// kernel and surfaces as a CUDA error at the next synchronization. Valid ids cost one compare,
// as before: no extra launch, no host read. (HECATE_SYNC_CHECKS=1 makes the torch op check the
// ids before the launch and raise the CPU op's ValueError instead: cuda_ops.cpp.)
#include <cassert>

#include "common.cuh"
#include "row_copy.cuh"

// What assert() calls on a failure (device code too), declared as the CUDA headers do, since
// glibc's <assert.h> leaves it undeclared under NDEBUG: the id check must not compile away.
extern "C" __host__ __device__ void __assert_fail(const char*, const char*, unsigned int,
                                                  const char*) noexcept;

namespace hecate::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;

// True when chunk id c is in [0, C); otherwise the `reporter` thread asserts.
__device__ __forceinline__ bool valid_chunk(int64_t c, int64_t C, bool reporter) {
  if (c >= 0 && c < C) return true;
  if (reporter) {
    __assert_fail("chunk id in [0, C) (the CPU op raises ValueError; HECATE_SYNC_CHECKS=1 names it)",
                  __FILE__, __LINE__, __func__);
  }
  return false;
}

#define HECATE_COLUMNS(v, count)                                                        \
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < (count); \
       v += static_cast<int64_t>(gridDim.x) * blockDim.x)

// grid.y walks the packed rows, grid.x the vectors of one row.
template <typename V>
__global__ void pack_kernel(const V* __restrict__ buffer, int64_t C, const int64_t* __restrict__ ids,
                            int64_t n, int64_t row_vecs, V* __restrict__ out) {
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const int64_t c = ids[i];
    if (!valid_chunk(c, C, blockIdx.x == 0 && threadIdx.x == 0)) continue;
    HECATE_COLUMNS(v, row_vecs) out[i * row_vecs + v] = buffer[c * row_vecs + v];
  }
}

template <typename V>
__global__ void unpack_kernel(const V* __restrict__ recv, const int64_t* __restrict__ ids, int64_t n,
                              int64_t row_vecs, V* __restrict__ out, int64_t C) {
  HECATE_COLUMNS(v, row_vecs) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = ids[i];
      if (valid_chunk(c, C, v == 0)) out[c * row_vecs + v] = recv[i * row_vecs + v];
    }
  }
}

template <typename T, int N>
__global__ void scatter_add_kernel(const T* __restrict__ recv, const int64_t* __restrict__ ids, int64_t n,
                                   int64_t row_vecs, T* __restrict__ out, int64_t C) {
  using Row = Vec<T, N>;
  const Row* recv_rows = reinterpret_cast<const Row*>(recv);
  Row* out_rows = reinterpret_cast<Row*>(out);
  HECATE_COLUMNS(v, row_vecs) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = ids[i];
      if (!valid_chunk(c, C, v == 0)) continue;
      Row acc = out_rows[c * row_vecs + v];  // this thread alone touches column v
      const Row add = recv_rows[i * row_vecs + v];
#pragma unroll
      for (int j = 0; j < N; ++j) acc.v[j] = from_acc<T>(to_acc(acc.v[j]) + to_acc(add.v[j]));
      out_rows[c * row_vecs + v] = acc;
    }
  }
}

unsigned column_blocks(int64_t row_vecs) { return grid_for(row_vecs, kThreads, 1 << 16); }

}  // namespace
}  // namespace hecate::cuda

extern "C" cudaError_t hecate_pack_chunks(const void* buffer_CS, int64_t C, int64_t row_bytes,
                                          const int64_t* chunk_ids_n, int64_t n, void* out_nS,
                                          cudaStream_t stream) {
  using namespace hecate::cuda;
  if (C < 0 || row_bytes < 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  return dispatch_row_vector(row_bytes, buffer_CS, out_nS, [&](auto vec) {
    using V = decltype(vec);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
    const dim3 grid(column_blocks(row_vecs), static_cast<unsigned>(n < kMaxGridY ? n : kMaxGridY));
    pack_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<const V*>(buffer_CS), C, chunk_ids_n, n,
                                                  row_vecs, static_cast<V*>(out_nS));
    return cudaGetLastError();
  });
}

extern "C" cudaError_t hecate_unpack_chunks(const void* recv_nS, const int64_t* chunk_ids_n, int64_t n,
                                            int64_t row_bytes, void* out_CS, int64_t C,
                                            cudaStream_t stream) {
  using namespace hecate::cuda;
  if (C < 0 || row_bytes < 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  return dispatch_row_vector(row_bytes, recv_nS, out_CS, [&](auto vec) {
    using V = decltype(vec);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
    unpack_kernel<V><<<column_blocks(row_vecs), kThreads, 0, stream>>>(
        static_cast<const V*>(recv_nS), chunk_ids_n, n, row_vecs, static_cast<V*>(out_CS), C);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t hecate_scatter_add_chunks(const void* recv_nS, hecate_dtype dtype,
                                                 const int64_t* chunk_ids_n, int64_t n, int64_t S,
                                                 void* out_CS, int64_t C, cudaStream_t stream) {
  using namespace hecate::cuda;
  if (C < 0 || S < 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0 || S == 0) return cudaSuccess;
  return HECATE_DISPATCH_ALL(dtype, [&] {
    const void* ptrs[] = {recv_nS, out_CS};
    return dispatch_vec<scalar_t>(S, ptrs, 2, [&](auto width) {
      constexpr int N = decltype(width)::value;
      scatter_add_kernel<scalar_t, N><<<column_blocks(S / N), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(recv_nS), chunk_ids_n, n, S / N, static_cast<scalar_t*>(out_CS), C);
      return cudaGetLastError();
    });
  });
}
