// unpermute (combine: weighted sum of each token's expert outputs) and its backward.
// One block per token, vectorized row accesses, fp32 accumulation (fp64 for fp64 data).
#include "common.cuh"

namespace hecate::cuda {
namespace {

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* base, int64_t vec_index) {
  return reinterpret_cast<const Vec<T, N>*>(base)[vec_index];
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* base, int64_t vec_index, const Vec<T, N>& v) {
  reinterpret_cast<Vec<T, N>*>(base)[vec_index] = v;
}

template <typename T, int N, typename A = typename Acc<T>::type>
__global__ void unpermute_kernel(const T* __restrict__ y_ND, int64_t num_rows,
                                 const int64_t* __restrict__ row_map_TK, const A* __restrict__ weights_TK,
                                 int64_t num_tokens, int64_t K, int64_t D, T* __restrict__ out_TD) {
  const int64_t row_vecs = D / N;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) {
      A acc[N];
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] = A(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_map_TK[t * K + k];
        if (r < 0 || r >= num_rows) continue;
        const A w = weights_TK ? weights_TK[t * K + k] : A(1);
        const Vec<T, N> y = load_vec<T, N>(y_ND + r * D, v);
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] += w * to_acc(y.v[j]);
      }
      Vec<T, N> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = from_acc<T>(acc[j]);
      store_vec<T, N>(out_TD + t * D, v, out);
    }
  }
}

template <typename T, int N, typename A = typename Acc<T>::type>
__global__ void unpermute_backward_kernel(const T* __restrict__ grad_TD, const T* __restrict__ y_ND,
                                          int64_t num_rows, const int64_t* __restrict__ row_map_TK,
                                          const A* __restrict__ weights_TK, int64_t num_tokens,
                                          int64_t K, int64_t D, T* __restrict__ grad_y_ND,
                                          A* __restrict__ grad_weights_TK) {
  __shared__ A scratch[kWarp];
  const int64_t row_vecs = D / N;
  // Every branch below depends only on (t, k), so the whole block takes it together and
  // block_sum's __syncthreads is reached by every thread.
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_map_TK[t * K + k];
      if (r < 0 || r >= num_rows) {
        if (grad_weights_TK && threadIdx.x == 0) grad_weights_TK[t * K + k] = A(0);
        continue;
      }
      const A w = weights_TK ? weights_TK[t * K + k] : A(1);
      A dot = A(0);
      for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) {
        const Vec<T, N> g = load_vec<T, N>(grad_TD + t * D, v);
        Vec<T, N> gy;
        if (grad_weights_TK) {
          const Vec<T, N> y = load_vec<T, N>(y_ND + r * D, v);
#pragma unroll
          for (int j = 0; j < N; ++j) dot += to_acc(g.v[j]) * to_acc(y.v[j]);
        }
#pragma unroll
        for (int j = 0; j < N; ++j) gy.v[j] = from_acc<T>(w * to_acc(g.v[j]));
        store_vec<T, N>(grad_y_ND + r * D, v, gy);
      }
      if (grad_weights_TK) {
        dot = block_sum(dot, scratch);
        if (threadIdx.x == 0) grad_weights_TK[t * K + k] = dot;
      }
    }
  }
}

}  // namespace
}  // namespace hecate::cuda

extern "C" cudaError_t hecate_unpermute(const void* y_ND, hecate_dtype dtype, int64_t N,
                                        const int64_t* row_map_TK, const void* weights_TK, int64_t T,
                                        int64_t K, int64_t D, void* out_TD, cudaStream_t stream) {
  using namespace hecate::cuda;
  if (T < 0 || K < 0 || D < 0 || N < 0) return cudaErrorInvalidValue;
  if (T == 0 || D == 0) return cudaSuccess;
  return HECATE_DISPATCH_FLOAT(dtype, [&] {
    using A = typename Acc<scalar_t>::type;
    const void* ptrs[] = {y_ND, out_TD};
    return dispatch_vec<scalar_t>(D, ptrs, 2, [&](auto width) {
      constexpr int W = decltype(width)::value;
      unpermute_kernel<scalar_t, W><<<grid_for(T, 1), row_threads(D / W), 0, stream>>>(
          static_cast<const scalar_t*>(y_ND), N, row_map_TK, static_cast<const A*>(weights_TK), T, K, D,
          static_cast<scalar_t*>(out_TD));
      return cudaGetLastError();
    });
  });
}

extern "C" cudaError_t hecate_unpermute_backward(const void* grad_TD, const void* y_ND, hecate_dtype dtype,
                                                 int64_t N, const int64_t* row_map_TK,
                                                 const void* weights_TK, int64_t T, int64_t K, int64_t D,
                                                 void* grad_y_ND, void* grad_weights_TK,
                                                 cudaStream_t stream) {
  using namespace hecate::cuda;
  if (T < 0 || K < 0 || D < 0 || N < 0) return cudaErrorInvalidValue;
  if (T == 0 || K == 0) return cudaSuccess;
  return HECATE_DISPATCH_FLOAT(dtype, [&] {
    using A = typename Acc<scalar_t>::type;
    const void* ptrs[] = {grad_TD, y_ND, grad_y_ND};
    return dispatch_vec<scalar_t>(D, ptrs, 3, [&](auto width) {
      constexpr int W = decltype(width)::value;
      unpermute_backward_kernel<scalar_t, W><<<grid_for(T, 1), row_threads(D / W), 0, stream>>>(
          static_cast<const scalar_t*>(grad_TD), static_cast<const scalar_t*>(y_ND), N, row_map_TK,
          static_cast<const A*>(weights_TK), T, K, D, static_cast<scalar_t*>(grad_y_ND),
          static_cast<A*>(grad_weights_TK));
      return cudaGetLastError();
    });
  });
}
