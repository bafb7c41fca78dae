// flash_attention / moh_attention on CUDA (sm_80 / sm_90): tiled attention, online softmax.
//
// Correctness first: one block of 128 threads per (query tile of kRowsQ rows, head, batch),
// shared-memory tiles of Q, K, V and the output accumulator in the math type, scalar FMAs
// (no tensor cores). The backward is FlashAttention-2's recomputation from the logsumexp, one
// block per (key tile, query head, batch); dQ, dK and dV are accumulated with atomicAdd into
// zeroed math-type buffers (dK / dV of a GQA group sum over its query heads), so gradient
// sums are not bitwise deterministic. Contract: docs/ops.md; mask rules as the CPU kernel.
#include <cfloat>
#include <cmath>

#include "common.cuh"

namespace hecate::cuda {
namespace {

constexpr int kRowsQ = 16;  // query rows per tile
constexpr int kRowsK = 16;  // key rows per tile
constexpr int kThreads = 128;

struct AttnShape {
  int64_t B, H, G, Sq, Sk, d;
  double scale;
  int causal;
  int64_t window, sinks, offset;  // offset: position of query row s is s + offset (Sk - Sq)
  const int64_t* block_offsets;   // [H, nqb + 1] or null
  const int64_t* block_cols;
  int64_t block_size, nqb;
};

template <typename acc_t> __device__ __forceinline__ acc_t neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -INFINITY; }

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Key blocks of a block list are strictly ascending per (head, query block): binary search.
__device__ bool block_listed(const AttnShape& s, int64_t h, int64_t row, int64_t key) {
  const int64_t qb = row / s.block_size, kb = key / s.block_size;
  const int64_t* off = s.block_offsets + h * (s.nqb + 1) + qb;
  int64_t lo = off[0], hi = off[1];
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t c = s.block_cols[mid];
    if (c == kb) return true;
    if (c < kb) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

// Whether query row `row` (of head h) sees key j: the rules of docs/ops.md.
__device__ bool visible(const AttnShape& s, int64_t h, int64_t row, int64_t j) {
  const int64_t p = row + s.offset;
  if (s.causal && j > p) return false;
  if (j < s.sinks) return true;
  if (s.window > 0) {
    const int64_t dist = s.causal ? p - j : (p >= j ? p - j : j - p);
    if (dist >= s.window) return false;
  }
  return s.block_offsets == nullptr || block_listed(s, h, row, j);
}

// Whether any query position in [pmin, pmax] can see a key in [j0, j1] (a cheap superset).
__device__ bool tile_reachable(const AttnShape& s, int64_t pmin, int64_t pmax, int64_t j0, int64_t j1) {
  if (s.causal && j0 > pmax) return false;
  if (j0 < s.sinks) return true;
  if (s.window > 0) {
    if (pmin - j1 >= s.window) return false;
    if (!s.causal && j0 - pmax >= s.window) return false;
  }
  return true;
}

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) { return to_acc(*p); }

// Row stride of the Q, dO, K and V tiles in shared memory: d made odd (d + 1 for even d). The
// Q·Kᵀ and dO·Vᵀ loops read, at one column e, 16 key rows (the backward's lanes) or 16 query rows
// (the forward's) per warp, and two rows of the other operand; with an even stride such rows share
// banks (a multiple of 32, the usual head dims: all 16 in one bank; before Q had stride d, two Q
// rows 2-way; K had d + 1, which for d = 31 mod 32 was a multiple of 32 again). An odd stride
// puts 16 consecutive rows in 16 banks (32 for 4-byte words; 16 bank pairs for fp64's 8-byte
// words), whatever d. tests/test_gpu_path_attention_banks.py counts every access of both kernels.
__host__ __device__ __forceinline__ int64_t smem_stride(int64_t d) { return d | 1; }

// ---------------------------------------------------------------- forward

// Grid (query tiles, H, B). Shared: q[kRowsQ][ss], k[kRowsK][ss], v[kRowsK][ss], o[kRowsQ][d],
// p[kRowsK][kRowsQ] (key-major: see the Q·Kᵀ loop), m / l / corr[kRowsQ], all acc_t
// (ss = smem_stride(d)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, AttnShape s,
                     const uint8_t* __restrict__ row_active,
                     const typename Acc<scalar_t>::type* __restrict__ row_weight,
                     scalar_t* __restrict__ out, scalar_t* __restrict__ out_raw,
                     typename Acc<scalar_t>::type* __restrict__ lse) {
  using acc_t = typename Acc<scalar_t>::type;
  extern __shared__ unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t d = s.d, ss = smem_stride(d);
  acc_t* sk = sq + kRowsQ * ss;
  acc_t* sv = sk + kRowsK * ss;
  acc_t* so = sv + kRowsK * ss;
  acc_t* sp = so + kRowsQ * d;
  acc_t* sm = sp + kRowsQ * kRowsK;
  acc_t* sl = sm + kRowsQ;
  acc_t* scorr = sl + kRowsQ;
  __shared__ int any_active;

  const int64_t b = blockIdx.z, h = blockIdx.y, r0 = static_cast<int64_t>(blockIdx.x) * kRowsQ;
  const int64_t g = h / (s.H / s.G);
  const int64_t rows = min(static_cast<int64_t>(kRowsQ), s.Sq - r0);
  const int64_t bh = b * s.H + h;
  const int tid = threadIdx.x;
  const acc_t scale = static_cast<acc_t>(s.scale);

  if (tid == 0) {
    int any = 0;
    for (int64_t r = 0; r < rows; ++r) any |= row_active == nullptr || row_active[bh * s.Sq + r0 + r];
    any_active = any;
  }
  for (int64_t i = tid; i < kRowsQ * d; i += kThreads) {
    const int64_t r = i / d, c = i % d;
    sq[r * ss + c] = r < rows ? load(q + (bh * s.Sq + r0 + r) * d + c) : acc_t(0);
    so[i] = 0;
  }
  if (tid < kRowsQ) {
    sm[tid] = neg_inf<acc_t>();
    sl[tid] = 0;
  }
  __syncthreads();
  if (!any_active) {
    // Unselected MoH rows: out, out_raw stay zero (the wrapper zero-fills), lse -inf.
    if (tid < rows) lse[bh * s.Sq + r0 + tid] = neg_inf<acc_t>();
    return;
  }
  const int64_t pmin = r0 + s.offset, pmax = r0 + rows - 1 + s.offset;
  for (int64_t j0 = 0; j0 < s.Sk; j0 += kRowsK) {
    const int64_t keys = min(static_cast<int64_t>(kRowsK), s.Sk - j0);
    if (!tile_reachable(s, pmin, pmax, j0, j0 + keys - 1)) continue;
    for (int64_t i = tid; i < kRowsK * d; i += kThreads) {
      const int64_t r = i / d, c = i % d;
      const bool in = r < keys;
      sk[r * ss + c] = in ? load(k + ((b * s.G + g) * s.Sk + j0 + r) * d + c) : acc_t(0);
      sv[r * ss + c] = in ? load(v + ((b * s.G + g) * s.Sk + j0 + r) * d + c) : acc_t(0);
    }
    __syncthreads();
    // Query row r = i % kRowsQ, key c = i / kRowsQ: a warp's lanes take 16 query rows of 2 keys
    // (odd stride: 16 banks; the 2 key rows: 2 banks) and store p key-major at sp[c][r] = sp[i],
    // 32 consecutive words. Row-major p (sp[r][c], the layout before) made the softmax below, one
    // thread per row walking its 16 scores, put 8 rows in each bank: 8-way.
    for (int i = tid; i < kRowsQ * kRowsK; i += kThreads) {
      const int r = i % kRowsQ, c = i / kRowsQ;
      acc_t dot = neg_inf<acc_t>();
      if (r < rows && c < keys && visible(s, h, r0 + r, j0 + c)) {
        dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += sq[r * ss + e] * sk[c * ss + e];
        dot *= scale;
      }
      sp[i] = dot;
    }
    __syncthreads();
    if (tid < kRowsQ) {  // online softmax, one thread per row; key c of row tid at p[c * kRowsQ]
      acc_t* p = sp + tid;
      acc_t mx = sm[tid];
      for (int c = 0; c < kRowsK; ++c) mx = p[c * kRowsQ] > mx ? p[c * kRowsQ] : mx;
      acc_t corr = 1, sum = 0;
      if (mx == neg_inf<acc_t>()) {
        for (int c = 0; c < kRowsK; ++c) p[c * kRowsQ] = 0;
      } else {
        corr = sm[tid] == neg_inf<acc_t>() ? acc_t(0) : exp_acc(sm[tid] - mx);
        for (int c = 0; c < kRowsK; ++c) {
          p[c * kRowsQ] = p[c * kRowsQ] == neg_inf<acc_t>() ? acc_t(0) : exp_acc(p[c * kRowsQ] - mx);
          sum += p[c * kRowsQ];
        }
        sm[tid] = mx;
      }
      sl[tid] = sl[tid] * corr + sum;
      scorr[tid] = corr;
    }
    __syncthreads();
    for (int64_t i = tid; i < kRowsQ * d; i += kThreads) {
      const int64_t r = i / d, c = i % d;
      acc_t acc = so[i] * scorr[r];
      for (int j = 0; j < kRowsK; ++j) acc += sp[j * kRowsQ + r] * sv[j * ss + c];
      so[i] = acc;
    }
    __syncthreads();
  }
  for (int64_t i = tid; i < rows * d; i += kThreads) {
    const int64_t r = i / d, c = i % d, row = bh * s.Sq + r0 + r;
    const bool active = row_active == nullptr || row_active[row];
    const acc_t l = sl[r];
    const acc_t o = (active && l > 0) ? so[i] / l : acc_t(0);
    const acc_t w = row_weight == nullptr ? acc_t(1) : row_weight[row];
    out[row * d + c] = from_acc<scalar_t>(o * w);
    if (out_raw != nullptr) out_raw[row * d + c] = from_acc<scalar_t>(o);
  }
  if (tid < rows) {
    const int64_t row = bh * s.Sq + r0 + tid;
    const bool active = row_active == nullptr || row_active[row];
    lse[row] = (active && sl[tid] > 0) ? sm[tid] + log_acc(sl[tid]) : neg_inf<acc_t>();
  }
}

// ---------------------------------------------------------------- backward

// Grid (key tiles, H, B): one block owns the keys [j0, j0 + kRowsK) of query head h and walks
// every query tile that can see them. dout and delta are in the math type (the wrapper folds the
// MoH weights in); rows with lse = -inf contribute nothing. Shared: k[kRowsK][ss],
// v[kRowsK][ss], dk[kRowsK][d], dv[kRowsK][d], q[kRowsQ][ss], do[kRowsQ][ss],
// p / ds[kRowsQ][kRowsK], lse / delta[kRowsQ], all acc_t (ss = smem_stride(d)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attention_bwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, AttnShape s,
                     const typename Acc<scalar_t>::type* __restrict__ dout,
                     const typename Acc<scalar_t>::type* __restrict__ lse,
                     const typename Acc<scalar_t>::type* __restrict__ delta,
                     typename Acc<scalar_t>::type* __restrict__ dq,
                     typename Acc<scalar_t>::type* __restrict__ dk,
                     typename Acc<scalar_t>::type* __restrict__ dv) {
  using acc_t = typename Acc<scalar_t>::type;
  extern __shared__ unsigned char smem_raw[];
  const int64_t d = s.d, ss = smem_stride(d);
  acc_t* sk = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sv = sk + kRowsK * ss;
  acc_t* sdk = sv + kRowsK * ss;
  acc_t* sdv = sdk + kRowsK * d;
  acc_t* sq = sdv + kRowsK * d;
  acc_t* sdo = sq + kRowsQ * ss;
  acc_t* sp = sdo + kRowsQ * ss;
  acc_t* sds = sp + kRowsQ * kRowsK;
  acc_t* slse = sds + kRowsQ * kRowsK;
  acc_t* sdelta = slse + kRowsQ;

  const int64_t b = blockIdx.z, h = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kRowsK;
  const int64_t g = h / (s.H / s.G), bh = b * s.H + h, bg = b * s.G + g;
  const int64_t keys = min(static_cast<int64_t>(kRowsK), s.Sk - j0);
  const int tid = threadIdx.x;
  const acc_t scale = static_cast<acc_t>(s.scale);

  for (int64_t i = tid; i < kRowsK * d; i += kThreads) {
    const int64_t r = i / d, c = i % d;
    const bool in = r < keys;
    sk[r * ss + c] = in ? load(k + (bg * s.Sk + j0 + r) * d + c) : acc_t(0);
    sv[r * ss + c] = in ? load(v + (bg * s.Sk + j0 + r) * d + c) : acc_t(0);
    sdk[i] = 0;
    sdv[i] = 0;
  }
  __syncthreads();
  for (int64_t r0 = 0; r0 < s.Sq; r0 += kRowsQ) {
    const int64_t rows = min(static_cast<int64_t>(kRowsQ), s.Sq - r0);
    if (!tile_reachable(s, r0 + s.offset, r0 + rows - 1 + s.offset, j0, j0 + keys - 1)) continue;
    for (int64_t i = tid; i < kRowsQ * d; i += kThreads) {
      const int64_t r = i / d, c = i % d;
      const bool in = r < rows;
      sq[r * ss + c] = in ? load(q + (bh * s.Sq + r0 + r) * d + c) : acc_t(0);
      sdo[r * ss + c] = in ? dout[(bh * s.Sq + r0 + r) * d + c] : acc_t(0);
    }
    if (tid < kRowsQ) {
      slse[tid] = tid < rows ? lse[bh * s.Sq + r0 + tid] : neg_inf<acc_t>();
      sdelta[tid] = tid < rows ? delta[bh * s.Sq + r0 + tid] : acc_t(0);
    }
    __syncthreads();
    // Query row r = i / kRowsK, key c = i % kRowsK: a warp reads 16 key rows (odd stride: 16
    // banks) and 2 query rows (2 banks) at each column e.
    for (int i = tid; i < kRowsQ * kRowsK; i += kThreads) {
      const int r = i / kRowsK, c = i % kRowsK;
      acc_t p = 0, ds = 0;
      if (r < rows && c < keys && slse[r] != neg_inf<acc_t>() && visible(s, h, r0 + r, j0 + c)) {
        acc_t dot = 0, dp = 0;
        for (int64_t e = 0; e < d; ++e) {
          dot += sq[r * ss + e] * sk[c * ss + e];
          dp += sdo[r * ss + e] * sv[c * ss + e];
        }
        p = exp_acc(dot * scale - slse[r]);
        ds = p * (dp - sdelta[r]);
      }
      sp[i] = p;
      sds[i] = ds;
    }
    __syncthreads();
    for (int64_t i = tid; i < kRowsK * d; i += kThreads) {
      const int64_t j = i / d, c = i % d;
      acc_t accv = 0, acck = 0;
      for (int r = 0; r < kRowsQ; ++r) {
        accv += sp[r * kRowsK + j] * sdo[r * ss + c];
        acck += sds[r * kRowsK + j] * sq[r * ss + c];
      }
      sdv[i] += accv;
      sdk[i] += acck * scale;
    }
    for (int64_t i = tid; i < rows * d; i += kThreads) {
      const int64_t r = i / d, c = i % d;
      acc_t acc = 0;
      for (int j = 0; j < kRowsK; ++j) acc += sds[r * kRowsK + j] * sk[j * ss + c];
      if (acc != acc_t(0)) atomicAdd(dq + (bh * s.Sq + r0 + r) * d + c, acc * scale);
    }
    __syncthreads();
  }
  for (int64_t i = tid; i < keys * d; i += kThreads) {
    const int64_t j = i / d, c = i % d;
    atomicAdd(dk + (bg * s.Sk + j0 + j) * d + c, sdk[i]);
    atomicAdd(dv + (bg * s.Sk + j0 + j) * d + c, sdv[i]);
  }
}

AttnShape make_shape(int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk, int64_t d, double scale,
                     int causal, int64_t window, int64_t sinks, const int64_t* block_offsets,
                     const int64_t* block_cols, int64_t block_size) {
  AttnShape s{B, H, G, Sq, Sk, d, scale, causal, window, sinks, Sk - Sq, block_offsets, block_cols,
              block_size, block_size > 0 ? (Sq + block_size - 1) / block_size : 0};
  if (block_offsets == nullptr) s.block_size = 1;
  return s;
}

// Dynamic shared memory of each kernel (the layouts at the top of the kernels), in bytes.
size_t fwd_smem(size_t acc_bytes, int64_t d) {
  return acc_bytes * ((kRowsQ + 2 * kRowsK) * smem_stride(d) + kRowsQ * d + kRowsQ * kRowsK + 3 * kRowsQ);
}
size_t bwd_smem(size_t acc_bytes, int64_t d) {
  return acc_bytes * ((2 * kRowsK + 2 * kRowsQ) * smem_stride(d) + 2 * kRowsK * d + 2 * kRowsQ * kRowsK +
                      2 * kRowsQ);
}

bool bad_shape(int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk, int64_t d, int64_t block_size,
               const int64_t* block_offsets) {
  return B < 0 || H < 1 || G < 1 || H % G != 0 || Sq < 0 || Sk < 0 || d < 1 || d > 256 ||
         B > 65535 || H > 65535 || (block_offsets != nullptr && block_size < 1);
}

}  // namespace
}  // namespace hecate::cuda

extern "C" size_t hecate_attention_smem_bytes(hecate_dtype dtype, int64_t d, int backward) {
  using namespace hecate::cuda;
  const size_t acc_bytes = dtype == HECATE_F64 ? sizeof(double) : sizeof(float);
  // The forward also holds one static int (any_active).
  return backward ? bwd_smem(acc_bytes, d) : fwd_smem(acc_bytes, d) + sizeof(int);
}

extern "C" cudaError_t hecate_attention_fwd(const void* q, const void* k, const void* v, hecate_dtype dtype,
                                            int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk,
                                            int64_t d, double scale, int causal, int64_t window,
                                            int64_t sinks, const int64_t* block_offsets,
                                            const int64_t* block_cols, int64_t block_size,
                                            const uint8_t* row_active, const void* row_weight, void* out,
                                            void* out_raw, void* lse, cudaStream_t stream) {
  using namespace hecate::cuda;
  if (bad_shape(B, H, G, Sq, Sk, d, block_size, block_offsets)) return cudaErrorInvalidValue;
  if (B == 0 || Sq == 0) return cudaSuccess;
  const AttnShape s = make_shape(B, H, G, Sq, Sk, d, scale, causal, window, sinks, block_offsets,
                                 block_cols, block_size);
  const dim3 grid(static_cast<unsigned>((Sq + kRowsQ - 1) / kRowsQ), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  return HECATE_DISPATCH_FLOAT(dtype, [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const size_t smem = fwd_smem(sizeof(acc_t), d);
    cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<scalar_t>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    attention_fwd_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), s,
        row_active, static_cast<const acc_t*>(row_weight), static_cast<scalar_t*>(out),
        static_cast<scalar_t*>(out_raw), static_cast<acc_t*>(lse));
    return cudaGetLastError();
  });
}

extern "C" cudaError_t hecate_attention_bwd(const void* q, const void* k, const void* v, hecate_dtype dtype,
                                            int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk,
                                            int64_t d, double scale, int causal, int64_t window,
                                            int64_t sinks, const int64_t* block_offsets,
                                            const int64_t* block_cols, int64_t block_size,
                                            const void* dout, const void* lse, const void* delta,
                                            void* dq, void* dk, void* dv, cudaStream_t stream) {
  using namespace hecate::cuda;
  if (bad_shape(B, H, G, Sq, Sk, d, block_size, block_offsets)) return cudaErrorInvalidValue;
  if (B == 0 || Sq == 0 || Sk == 0) return cudaSuccess;
  const AttnShape s = make_shape(B, H, G, Sq, Sk, d, scale, causal, window, sinks, block_offsets,
                                 block_cols, block_size);
  const dim3 grid(static_cast<unsigned>((Sk + kRowsK - 1) / kRowsK), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  return HECATE_DISPATCH_FLOAT(dtype, [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const size_t smem = bwd_smem(sizeof(acc_t), d);
    cudaError_t err = cudaFuncSetAttribute(attention_bwd_kernel<scalar_t>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    attention_bwd_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), s,
        static_cast<const acc_t*>(dout), static_cast<const acc_t*>(lse), static_cast<const acc_t*>(delta),
        static_cast<acc_t*>(dq), static_cast<acc_t*>(dk), static_cast<acc_t*>(dv));
    return cudaGetLastError();
  });
}
