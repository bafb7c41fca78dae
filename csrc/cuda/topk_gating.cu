// Fused router gating: scores (softmax or sigmoid, fp32), then top-k selection by
// scores + bias with ties going to the lower expert index. One warp per token.
#include <cfloat>
#include <climits>

#include "common.cuh"

namespace hecate::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr size_t kMaxSmemBytes = 48 * 1024;

constexpr double kRenormEps = 1e-20;  // same clamp as the CPU kernel and the reference

// Candidate of the k-th round of argmax: selection value, expert index, unbiased score.
template <typename A> struct Pick {
  A value;
  int index;
  A score;
};

// Strict total order of the selection: higher value first, then lower index.
template <typename A>
__device__ __forceinline__ bool ranks_before(A value, int index, A best_value, int best_index) {
  return value > best_value || (value == best_value && index < best_index);
}

template <typename A> __device__ __forceinline__ Pick<A> warp_argmax(Pick<A> p) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Pick<A> o;
    o.value = __shfl_xor_sync(0xffffffffu, p.value, offset);
    o.index = __shfl_xor_sync(0xffffffffu, p.index, offset);
    o.score = __shfl_xor_sync(0xffffffffu, p.score, offset);
    if (ranks_before(o.value, o.index, p.value, p.index)) p = o;
  }
  return p;  // identical on every lane (butterfly reduction)
}

// Each lane owns experts lane, lane + 32, ...; it reads back only what it wrote, so the
// per-token score row needs no synchronization whether it lives in shared or global memory.
// A is the math type (fp32, or fp64 for fp64 logits).
template <typename T, typename A>
__global__ void topk_gating_kernel(const T* __restrict__ logits_TE, const A* __restrict__ bias_E,
                                   int64_t num_tokens, int E, int K, int softmax, int renormalize,
                                   int use_smem, A* __restrict__ weights_TK,
                                   int64_t* __restrict__ indices_TK, A* __restrict__ scores_TE) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  A* smem_rows = reinterpret_cast<A*>(smem_bytes);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= num_tokens) return;  // whole warp leaves together; no block-level sync below

  const T* logits = logits_TE + t * E;
  A* scores = scores_TE + t * E;
  A* row = use_smem ? smem_rows + warp * E : scores;  // math-type working copy of this token

  A row_max = -INFINITY;
  for (int e = lane; e < E; e += kWarp) {
    const A x = static_cast<A>(to_acc(logits[e]));
    row[e] = x;
    row_max = x > row_max ? x : row_max;
  }
  if (softmax) {
    row_max = warp_max(row_max);
    A denom = 0;
    for (int e = lane; e < E; e += kWarp) {
      const A ex = exp(row[e] - row_max);
      row[e] = ex;
      denom += ex;
    }
    denom = warp_sum(denom);
    for (int e = lane; e < E; e += kWarp) {
      const A p = row[e] / denom;
      row[e] = p;
      scores[e] = p;
    }
  } else {
    for (int e = lane; e < E; e += kWarp) {
      const A p = A(1) / (A(1) + exp(-row[e]));
      row[e] = p;
      scores[e] = p;
    }
  }

  // k rounds of argmax. Round r only considers entries ranked strictly after the pick of
  // round r-1 in the (value desc, index asc) order, so no "already taken" mask is needed.
  // A NaN selection value (NaN logits, or inf - inf in the softmax) ranks as -inf: it compares
  // false with everything and would never be picked, leaving slots without an expert. Every
  // slot gets a real expert, as on the CPU (its weight is the NaN score, so the loss shows it);
  // an index of -1 would make the backward's gather fault on the device.
  A prev_value = INFINITY;
  int prev_index = -1;
  A weight_sum = 0;
  for (int r = 0; r < K; ++r) {
    Pick<A> best{-INFINITY, INT_MAX, 0};
    for (int e = lane; e < E; e += kWarp) {
      const A score = row[e];
      A value = bias_E ? score + bias_E[e] : score;
      if (value != value) value = -INFINITY;
      const bool after_prev = value < prev_value || (value == prev_value && e > prev_index);
      if (after_prev && ranks_before(value, e, best.value, best.index)) best = Pick<A>{value, e, score};
    }
    best = warp_argmax(best);
    prev_value = best.value;
    prev_index = best.index;
    weight_sum += best.score;  // K <= E entries, all ranked: every round finds one
    if (lane == 0) {
      indices_TK[t * K + r] = best.index;
      weights_TK[t * K + r] = best.score;
    }
  }
  if (renormalize && lane == 0) {
    // Divide, as the CPU kernel and the reference do (a lone top-1 weight is exactly 1).
    const A denom = weight_sum > A(kRenormEps) ? weight_sum : A(kRenormEps);
    for (int r = 0; r < K; ++r) weights_TK[t * K + r] /= denom;  // this thread wrote them
  }
}

}  // namespace
}  // namespace hecate::cuda

extern "C" cudaError_t hecate_topk_gating(const void* logits_TE, hecate_dtype dtype, const void* bias_E,
                                          int64_t T, int64_t E, int64_t K,
                                          hecate_score_func score_func, int renormalize,
                                          void* weights_TK, int64_t* indices_TK, void* scores_TE,
                                          cudaStream_t stream) {
  using namespace hecate::cuda;
  if (T < 0 || E < 1 || K < 1 || K > E || E > INT_MAX) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const int softmax = score_func == HECATE_SCORE_SOFTMAX;
  return HECATE_DISPATCH_FLOAT(dtype, [&] {
    using A = typename Acc<scalar_t>::type;
    const size_t smem_bytes = sizeof(A) * static_cast<size_t>(E) * kWarpsPerBlock;
    const int use_smem = smem_bytes <= kMaxSmemBytes;  // else the rows live in scores_TE
    topk_gating_kernel<scalar_t, A><<<blocks, kWarpsPerBlock * kWarp, use_smem ? smem_bytes : 0, stream>>>(
        static_cast<const scalar_t*>(logits_TE), static_cast<const A*>(bias_E), T, static_cast<int>(E),
        static_cast<int>(K), softmax, renormalize, use_smem, static_cast<A*>(weights_TK), indices_TK,
        static_cast<A*>(scores_TE));
    return cudaGetLastError();
  });
}
