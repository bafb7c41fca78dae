// flash_attention / moh_attention on the CPU: tiled attention with an online softmax.
//
// Never materialises the [S, S] scores: a worker holds one query tile (<= kTileRows rows) and
// one key tile (<= kTileK columns) of scores at a time. QK^T, PV and the five backward products are
// BLAS GEMMs on tile views (MKL's sgemm_/dgemm_ when torch exports them, else at::addmm_); the
// softmax loops are plain loops compiled for AVX-512 / AVX2 / baseline (target_clones) with a
// polynomial exp, so they vectorise without ATen's per-capability builds.
//
// A query tile is a list of (token, head) rows: consecutive tokens for flash_attention, the
// tokens that routed to a head for moh_attention (MoH only computes selected pairs). Each tile
// visits only the key tiles its mask can reach (causal, sliding window, sink tokens,
// block-sparse list), so work falls with the visible area. Backward recomputes the scores from
// the saved logsumexp (FlashAttention-2); contract in docs/ops.md.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

// MKL / BLAS entry points that libtorch_cpu exports on x86 wheels. Weak: when a build of torch
// lacks them, they resolve to null and the GEMMs go through at::addmm_ instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HECATE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HECATE_VECTOR_CLONES
#endif

namespace hecate::cpu {
namespace {

constexpr int64_t kTileRows = 256;  // query rows per tile: (token, head) pairs of one GQA group
constexpr int64_t kTileK = 256;     // key columns per tile
constexpr int64_t kTileKWindow = 128;  // with a sliding window (less overhang past the window)
constexpr int64_t kMaxHeadDim = 256;

// ---------------------------------------------------------------- GEMM on row-major tiles

// C[M, N] = alpha * op(A) op(B) + beta * C, all row-major with leading dimensions (row strides).
// Column-major BLAS computes C^T = op(B)^T op(A)^T, hence the swapped operands.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
             int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  auto blas = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_;
    else return dgemm_;
  }();
  if (blas != nullptr) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    blas(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is rows x cols; X itself is stored row-major with leading dimension ld.
    auto x = trans ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t()
                   : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
    return x;
  };
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    c.mul_(beta);
    return;
  }
  c.addmm_(view(A, trans_a, M, K, lda), view(B, trans_b, K, N, ldb), beta, alpha);
}

// ---------------------------------------------------------------- vectorised softmax pieces

// e^x for x <= ~0; exactly 0 below -87 (covers -inf = masked). Round-to-nearest range
// reduction x = (n + f) ln2 with |f| <= 1/2 (the 1.5 * 2^23 trick: no floor call, no branch, so
// the loops below vectorise) and a degree-6 Taylor polynomial of e^(f ln2): ~1 ulp.
inline __attribute__((always_inline)) float fast_exp(float x) {
  const bool under = x < -87.0f;
  const float t = (under ? -87.0f : x) * 1.4426950408889634f;
  const float r = t + 12582912.0f;
  const int32_t n = std::bit_cast<int32_t>(r) - 0x4B400000;
  const float f = (t - (r - 12582912.0f)) * 0.6931471805599453f;
  float p = 1.3888889e-3f;
  p = p * f + 8.3333333e-3f;
  p = p * f + 4.1666667e-2f;
  p = p * f + 1.6666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const float scale = std::bit_cast<float>((n + 127) << 23);
  return under ? 0.0f : p * scale;
}

// The loops carry `omp simd` (the extension is built with -fopenmp) so that reductions
// vectorise without -ffast-math.
HECATE_VECTOR_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// x = exp(x - shift); returns the sum.
HECATE_VECTOR_CLONES float exp_shift_sum(float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_exp(x[i] - shift);
    x[i] = e;
    s += e;
  }
  return s;
}

HECATE_VECTOR_CLONES void exp_shift(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = fast_exp(x[i] - shift);
}

// dp = p * (dp - delta)
HECATE_VECTOR_CLONES void softmax_grad(float* dp, const float* p, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

// fp64 versions (gradcheck only): plain std::exp.
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
double exp_shift_sum(double* x, int64_t n, double shift) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}
void exp_shift(double* x, int64_t n, double shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - shift);
}
void softmax_grad(double* dp, const double* p, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

// ---------------------------------------------------------------- masks and tile lists

// Which keys a query at position p sees (docs/ops.md, "Masks"):
//   causal -> key j <= p;  window w > 0 -> p - j < w (causal) or |p - j| < w (non-causal);
//   j < sinks -> visible regardless of window and block list (still causal);
//   block list -> the (query block, key block) pair must be listed for the head.
struct Mask {
  bool causal = true;
  int64_t window = 0, sinks = 0;
  int64_t offset = 0;  // position of query row s is s + offset (Sk - Sq: bottom-right aligned)
  int64_t Sk = 0;
  const int64_t* block_offsets = nullptr;  // [H, n_qblocks + 1], into block_cols
  const int64_t* block_cols = nullptr;
  int64_t n_qblocks = 0;
};

struct KeyTile {
  int64_t j0, len;
  bool pattern;  // the window / block-list part of the mask applies (else only sink keys)
  bool full;     // every (row, key) of the tile is visible: no element mask needed
};

// Key tiles a query tile (positions in [pmin, pmax], query block qb of head h) must visit.
void key_tiles(const Mask& mk, int64_t h, int64_t qb, int64_t pmin, int64_t pmax, int64_t tile_k,
               std::vector<KeyTile>& out) {
  out.clear();
  if (mk.Sk == 0) return;
  const int64_t causal_hi = mk.causal ? std::min(mk.Sk - 1, pmax) : mk.Sk - 1;
  int64_t hi = causal_hi;  // last key of the window / pattern part
  if (!mk.causal && mk.window > 0) hi = std::min(hi, pmax + mk.window - 1);
  const int64_t lo = mk.window > 0 ? std::max<int64_t>(0, pmin - mk.window + 1) : 0;
  const int64_t sink_hi = std::min(mk.sinks - 1, causal_hi);  // sinks ignore the window
  const int64_t last = std::max(hi, sink_hi);
  if (last < 0) return;
  const bool listed = mk.block_offsets != nullptr;  // (block_cols may be null when empty)
  const int64_t* cols = nullptr;
  const int64_t* cols_end = nullptr;
  if (listed) {
    const int64_t* row = mk.block_offsets + h * (mk.n_qblocks + 1) + qb;
    cols = mk.block_cols + row[0];
    cols_end = mk.block_cols + row[1];
  }
  for (int64_t t = 0; t * tile_k <= last; ++t) {
    const int64_t j0 = t * tile_k, len = std::min(tile_k, mk.Sk - j0), j1 = j0 + len - 1;
    bool pattern = lo <= hi && j1 >= lo && j0 <= hi;
    if (listed) {
      while (cols != cols_end && *cols < t) ++cols;
      pattern = pattern && cols != cols_end && *cols == t;
    }
    const bool sink = j0 <= sink_hi;
    if (!pattern && !sink) continue;
    bool full;
    if (pattern) {
      full = (!mk.causal || j1 <= pmin) && (mk.window <= 0 || pmax - j0 < mk.window) &&
             (mk.causal || mk.window <= 0 || j1 - pmin < mk.window);
    } else {
      full = j1 < mk.sinks && (!mk.causal || j1 <= pmin);
    }
    out.push_back({j0, len, pattern, full});
  }
}

// Sets masked scores of one tile row (query position p) to -inf. Visible keys of a row are
// [0, sink_end) and, where the tile's pattern applies, one range [lo, hi].
template <typename acc_t>
void mask_row(acc_t* s, int64_t p, const KeyTile& kt, const Mask& mk) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  int64_t lo = 0, hi = mk.Sk - 1;
  if (mk.window > 0) {
    lo = p - mk.window + 1;
    if (!mk.causal) hi = p + mk.window - 1;
  }
  if (mk.causal) hi = std::min(hi, p);
  if (!kt.pattern) hi = lo - 1;
  const int64_t sink_end = mk.causal ? std::min(mk.sinks, p + 1) : mk.sinks;
  lo -= kt.j0;
  hi -= kt.j0;
  const int64_t sink_c = sink_end - kt.j0;
  for (int64_t c = 0; c < kt.len; ++c)
    if (!(c < sink_c || (c >= lo && c <= hi))) s[c] = ninf;
}

// ---------------------------------------------------------------- strided 4-D row access

template <typename T>
struct Rows {  // row (b, h, s) of a [B, H, S, d] tensor whose last dimension is contiguous
  T* base = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t)
      : base(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)),
        ss(t.size(2) <= 1 ? std::max(t.stride(2), t.size(3)) : t.stride(2)) {}
  T* operator()(int64_t b, int64_t h, int64_t s) const { return base + b * sb + h * sh + s * ss; }
};

// Rows are handed to BLAS with their row stride as leading dimension: it must be >= d.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  const bool ok = (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(-2) <= 1 || t.stride(-2) >= t.size(-1));
  return ok ? t : t.contiguous();
}

// An output [B, H, S, d] stored as [B, S, H, d] (what the output projection of a model reads).
at::Tensor empty_bshd(int64_t B, int64_t H, int64_t S, int64_t d, at::TensorOptions opts) {
  return at::empty({B, S, H, d}, opts).transpose(1, 2);
}

// A query tile: n (token, head) rows of batch b whose heads share kv head g, so one GEMM
// serves them all. Row r is token rows[r] of head heads[r]; positions span [pmin, pmax].
struct QTile {
  int64_t b, g, h, qb;      // h, qb: the head and query block of a block-list tile (else -1)
  int64_t off, n;           // rows at Problem::row_store[off, off + n)
  int64_t pmin, pmax;
  const int64_t* rows = nullptr;   // token indices
  const int64_t* heads = nullptr;  // query head of each row
  const int64_t* slots = nullptr;  // MoH: the routing slot k of each row (else null)
};

// Per-thread buffers, allocated through ATen so that memory profilers see them.
template <typename acc_t>
struct Scratch {
  at::Tensor storage;
  acc_t *q, *o, *s, *dp, *k, *v, *m, *l, *lse, *delta, *dq;
  Scratch(int64_t d, int64_t tq, int64_t tk, bool backward) {
    const int64_t bw = backward ? 1 : 0;
    const int64_t sizes[] = {tq * d, tq * d, tq * tk, bw * tq * tk, tk * d, tk * d, tq, tq, tq, tq,
                             bw * tq * d};
    int64_t total = 0;
    for (int64_t x : sizes) total += x;
    storage = at::empty({total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* p = storage.data_ptr<acc_t>();
    acc_t** slots[] = {&q, &o, &s, &dp, &k, &v, &m, &l, &lse, &delta, &dq};
    for (int i = 0; i < 11; ++i) {
      *slots[i] = p;
      p += sizes[i];
    }
  }
};

template <typename T, typename acc_t>
void load_row(acc_t* dst, const T* src, int64_t d, acc_t scale = acc_t(1)) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
}

// Key / value tile pointer: the input itself when it is already in the math type, else a
// converted copy in `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* kv_tile(const Rows<const scalar_t>& x, int64_t b, int64_t g, const KeyTile& kt,
                     int64_t d, acc_t* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = x.ss;
    return x(b, g, kt.j0);
  } else {
    for (int64_t c = 0; c < kt.len; ++c) load_row(buf + c * d, x(b, g, kt.j0 + c), d);
    ld = d;
    return buf;
  }
}

// ---------------------------------------------------------------- the attention problem

// Everything a forward or backward worker reads: inputs, mask and the tiles to run.
template <typename scalar_t>
struct Problem {
  int64_t B, H, G, Sq, Sk, d;
  double scale;
  Mask mask;
  Rows<const scalar_t> q, k, v;
  std::vector<QTile> tiles;     // query tiles, in a good scheduling order (costly first)
  int64_t tile_q = 1;           // most rows of a query tile
  std::vector<int64_t> row_store, head_store, slot_store;  // the rows of every tile
  // MoH routing (null for flash_attention)
  const float* weights = nullptr;  // [B, Sq, K] (fp32) or
  const double* weights64 = nullptr;
  int64_t K = 0;

  double weight(int64_t b, int64_t s, int64_t slot) const {
    const int64_t i = (b * Sq + s) * K + slot;
    return weights64 ? weights64[i] : weights[i];
  }
};

// Runs fn(tile_index, thread_scratch) over every query tile; tiles are claimed dynamically
// (atomic counter) because causal tiles differ in cost.
template <typename acc_t, typename Fn>
void for_each_tile(int64_t n_tiles, int64_t d, int64_t tile_q, int64_t tile_k, bool backward,
                   const Fn& fn) {
  if (n_tiles == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tiles);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      Scratch<acc_t> scratch(d, tile_q, tile_k, backward);
      std::vector<KeyTile> key_list;
      for (int64_t i = next++; i < n_tiles; i = next++) fn(i, scratch, key_list);
    }
  });
}

// Points every tile at its rows (after the stores stopped growing) and sizes the scratch.
template <typename scalar_t>
void finish_tiles(Problem<scalar_t>& pb, bool moh) {
  for (QTile& t : pb.tiles) {
    t.rows = pb.row_store.data() + t.off;
    t.heads = pb.head_store.data() + t.off;
    t.slots = moh ? pb.slot_store.data() + t.off : nullptr;
    t.pmin = std::numeric_limits<int64_t>::max();
    t.pmax = std::numeric_limits<int64_t>::min();
    for (int64_t r = 0; r < t.n; ++r) {
      t.pmin = std::min(t.pmin, t.rows[r] + pb.mask.offset);
      t.pmax = std::max(t.pmax, t.rows[r] + pb.mask.offset);
    }
    pb.tile_q = std::max(pb.tile_q, t.n);
  }
  // Later query tiles see more keys under a causal mask: schedule them first.
  std::stable_sort(pb.tiles.begin(), pb.tiles.end(),
                   [](const QTile& a, const QTile& b) { return a.pmax > b.pmax; });
}

// flash_attention: with a block list, one tile per (batch, head, query block) (the pattern is
// per head); otherwise the heads of a GQA group are stacked: tokens_per_tile x rep rows.
template <typename scalar_t>
void add_flash_tiles(Problem<scalar_t>& pb, int64_t block_size) {
  const int64_t rep = pb.H / pb.G;
  const int64_t tokens = block_size > 0 ? block_size : std::max<int64_t>(1, kTileRows / rep);
  pb.row_store.reserve(pb.B * pb.H * pb.Sq);
  pb.head_store.reserve(pb.B * pb.H * pb.Sq);
  for (int64_t s0 = 0, qb = 0; s0 < pb.Sq; s0 += tokens, ++qb) {
    const int64_t n = std::min(tokens, pb.Sq - s0);
    for (int64_t b = 0; b < pb.B; ++b)
      for (int64_t g = 0; g < pb.G; ++g) {
        if (block_size > 0) {
          for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
            pb.tiles.push_back({b, g, h, qb, static_cast<int64_t>(pb.row_store.size()), n, 0, 0});
            for (int64_t s = s0; s < s0 + n; ++s) {
              pb.row_store.push_back(s);
              pb.head_store.push_back(h);
            }
          }
        } else {
          pb.tiles.push_back({b, g, -1, -1, static_cast<int64_t>(pb.row_store.size()), n * rep, 0, 0});
          for (int64_t h = g * rep; h < (g + 1) * rep; ++h)
            for (int64_t s = s0; s < s0 + n; ++s) {
              pb.row_store.push_back(s);
              pb.head_store.push_back(h);
            }
        }
      }
  }
  finish_tiles(pb, false);
}

// moh_attention: per (batch, GQA group), the selected (token, head) pairs in token order, cut
// into tiles of kTileRows rows: work is proportional to the pairs the router chose.
template <typename scalar_t>
void add_moh_tiles(Problem<scalar_t>& pb, const int64_t* idx, int64_t K) {
  const int64_t rep = pb.H / pb.G;
  std::vector<std::vector<int64_t>> rows(pb.B * pb.G), heads(pb.B * pb.G), slots(pb.B * pb.G);
  for (int64_t b = 0; b < pb.B; ++b)
    for (int64_t s = 0; s < pb.Sq; ++s)
      for (int64_t slot = 0; slot < K; ++slot) {
        const int64_t h = idx[(b * pb.Sq + s) * K + slot];
        if (h < 0) continue;
        const int64_t bg = b * pb.G + h / rep;
        rows[bg].push_back(s);
        heads[bg].push_back(h);
        slots[bg].push_back(slot);
      }
  for (int64_t bg = 0; bg < pb.B * pb.G; ++bg) {
    const int64_t n = rows[bg].size();
    for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
      pb.tiles.push_back({bg / pb.G, bg % pb.G, -1, -1, static_cast<int64_t>(pb.row_store.size()) + r0,
                          std::min(kTileRows, n - r0), 0, 0});
    }
    pb.row_store.insert(pb.row_store.end(), rows[bg].begin(), rows[bg].end());
    pb.head_store.insert(pb.head_store.end(), heads[bg].begin(), heads[bg].end());
    pb.slot_store.insert(pb.slot_store.end(), slots[bg].begin(), slots[bg].end());
  }
  finish_tiles(pb, true);
}

// ---------------------------------------------------------------- forward

// out (weighted for MoH), out_raw (MoH only: unweighted), lse [B, H, Sq] in the math type.
template <typename scalar_t, typename acc_t>
void forward(const Problem<scalar_t>& pb, int64_t tile_k, const Rows<scalar_t>& out,
             const Rows<scalar_t>* out_raw, acc_t* lse) {
  const int64_t d = pb.d;
  const acc_t scale = static_cast<acc_t>(pb.scale);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for_each_tile<acc_t>(pb.tiles.size(), d, pb.tile_q, tile_k, false, [&](int64_t ti, Scratch<acc_t>& sc,
                                                     std::vector<KeyTile>& keys) {
    const QTile& t = pb.tiles[ti];
    const int64_t g = t.g, n = t.n;
    for (int64_t r = 0; r < n; ++r) load_row(sc.q + r * d, pb.q(t.b, t.heads[r], t.rows[r]), d);
    std::fill(sc.o, sc.o + n * d, acc_t(0));
    std::fill(sc.m, sc.m + n, ninf);
    std::fill(sc.l, sc.l + n, acc_t(0));
    key_tiles(pb.mask, t.h, t.qb, t.pmin, t.pmax, tile_k, keys);
    for (const KeyTile& kt : keys) {
      int64_t ldk, ldv;
      const acc_t* kp = kv_tile<scalar_t, acc_t>(pb.k, t.b, g, kt, d, sc.k, ldk);
      const acc_t* vp = kv_tile<scalar_t, acc_t>(pb.v, t.b, g, kt, d, sc.v, ldv);
      gemm_rm<acc_t>(false, true, n, kt.len, d, scale, sc.q, d, kp, ldk, acc_t(0), sc.s, tile_k);
      for (int64_t r = 0; r < n; ++r) {
        acc_t* s = sc.s + r * tile_k;
        if (!kt.full) mask_row(s, t.rows[r] + pb.mask.offset, kt, pb.mask);
        const acc_t m_new = std::max(sc.m[r], row_max(s, kt.len));
        if (m_new == ninf) {  // nothing visible yet in this row
          std::fill(s, s + kt.len, acc_t(0));
          continue;
        }
        const acc_t corr = sc.m[r] == ninf ? acc_t(0) : std::exp(sc.m[r] - m_new);
        sc.l[r] = sc.l[r] * corr + exp_shift_sum(s, kt.len, m_new);
        if (corr != acc_t(1)) {
          acc_t* o = sc.o + r * d;
          for (int64_t c = 0; c < d; ++c) o[c] *= corr;
        }
        sc.m[r] = m_new;
      }
      gemm_rm<acc_t>(false, false, n, d, kt.len, acc_t(1), sc.s, tile_k, vp, ldv, acc_t(1), sc.o, d);
    }
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = t.rows[r], h = t.heads[r];
      const acc_t l = sc.l[r];
      const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
      lse[(t.b * pb.H + h) * pb.Sq + s] = l > 0 ? sc.m[r] + std::log(l) : ninf;
      const acc_t* o = sc.o + r * d;
      const acc_t w = t.slots ? static_cast<acc_t>(pb.weight(t.b, s, t.slots[r])) : acc_t(1);
      scalar_t* dst = out(t.b, h, s);
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(o[c] * inv * w);
      if (out_raw) {
        scalar_t* raw = (*out_raw)(t.b, h, s);
        for (int64_t c = 0; c < d; ++c) raw[c] = static_cast<scalar_t>(o[c] * inv);
      }
    }
  });
}

// ---------------------------------------------------------------- backward

// grad_out and o: [B, H, Sq, d]; for MoH, o is the unweighted output and grad_w [B, Sq, K].
// dq [B, H, Sq, d] (scalar_t); dk_acc / dv_acc [splits, B, G, Sk, d] in the math type, zeroed.
template <typename scalar_t, typename acc_t>
void backward(const Problem<scalar_t>& pb, int64_t tile_k, const Rows<const scalar_t>& grad_out,
              const Rows<const scalar_t>& o, const acc_t* lse, const Rows<scalar_t>& dq,
              acc_t* dk_acc, acc_t* dv_acc, acc_t* grad_w, int64_t splits) {
  const int64_t d = pb.d, B = pb.B, G = pb.G, Sk = pb.Sk;
  const acc_t scale = static_cast<acc_t>(pb.scale);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // Tiles of one (b, g) share dK / dV rows: group the tiles by (b, g) and give each group
  // `splits` private accumulators; a worker claims (b, g, split) items.
  std::vector<std::vector<int64_t>> by_group(B * G);
  for (int64_t i = 0; i < static_cast<int64_t>(pb.tiles.size()); ++i) {
    const QTile& t = pb.tiles[i];
    by_group[t.b * G + t.g].push_back(i);
  }
  const int64_t items = B * G * splits;
  const int64_t kv_elems = B * G * Sk * d;
  for_each_tile<acc_t>(items, d, pb.tile_q, tile_k, true, [&](int64_t item, Scratch<acc_t>& sc, std::vector<KeyTile>& keys) {
    const int64_t group = item / splits, split = item % splits;
    const int64_t b = group / G, g = group % G;
    acc_t* dk = dk_acc + split * kv_elems + (b * G + g) * Sk * d;
    acc_t* dv = dv_acc + split * kv_elems + (b * G + g) * Sk * d;
    const auto& mine = by_group[group];
    for (size_t mi = split; mi < mine.size(); mi += splits) {
      const QTile& t = pb.tiles[mine[mi]];
      const int64_t n = t.n;
      acc_t* dout = sc.o;  // dO tile (weighted for MoH)
      for (int64_t r = 0; r < n; ++r) {
        const int64_t s = t.rows[r], h = t.heads[r];
        load_row(sc.q + r * d, pb.q(t.b, h, s), d);
        const scalar_t* go = grad_out(t.b, h, s);
        const scalar_t* orow = o(t.b, h, s);
        acc_t dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<acc_t>(go[c]) * static_cast<acc_t>(orow[c]);
        acc_t w = 1;
        if (t.slots) {
          w = static_cast<acc_t>(pb.weight(t.b, s, t.slots[r]));
          grad_w[(t.b * pb.Sq + s) * pb.K + t.slots[r]] = dot;
        }
        load_row(dout + r * d, go, d, w);
        sc.delta[r] = dot * w;
        sc.lse[r] = lse[(t.b * pb.H + h) * pb.Sq + s];
      }
      std::fill(sc.dq, sc.dq + n * d, acc_t(0));
      key_tiles(pb.mask, t.h, t.qb, t.pmin, t.pmax, tile_k, keys);
      for (const KeyTile& kt : keys) {
        int64_t ldk, ldv;
        const acc_t* kp = kv_tile<scalar_t, acc_t>(pb.k, t.b, g, kt, d, sc.k, ldk);
        const acc_t* vp = kv_tile<scalar_t, acc_t>(pb.v, t.b, g, kt, d, sc.v, ldv);
        acc_t* p = sc.s;
        gemm_rm<acc_t>(false, true, n, kt.len, d, scale, sc.q, d, kp, ldk, acc_t(0), p, tile_k);
        for (int64_t r = 0; r < n; ++r) {
          acc_t* row = p + r * tile_k;
          if (sc.lse[r] == ninf) {
            std::fill(row, row + kt.len, acc_t(0));
            continue;
          }
          if (!kt.full) mask_row(row, t.rows[r] + pb.mask.offset, kt, pb.mask);
          exp_shift(row, kt.len, sc.lse[r]);
        }
        // dV_j += P^T dO
        gemm_rm<acc_t>(true, false, kt.len, d, n, acc_t(1), p, tile_k, dout, d, acc_t(1),
                       dv + kt.j0 * d, d);
        // dP = dO V_j^T, then dS = P * (dP - delta)
        acc_t* ds = sc.dp;
        gemm_rm<acc_t>(false, true, n, kt.len, d, acc_t(1), dout, d, vp, ldv, acc_t(0), ds, tile_k);
        for (int64_t r = 0; r < n; ++r) softmax_grad(ds + r * tile_k, p + r * tile_k, kt.len, sc.delta[r]);
        // dK_j += scale dS^T Q ; dQ += scale dS K_j
        gemm_rm<acc_t>(true, false, kt.len, d, n, scale, ds, tile_k, sc.q, d, acc_t(1), dk + kt.j0 * d, d);
        gemm_rm<acc_t>(false, false, n, d, kt.len, scale, ds, tile_k, kp, ldk, acc_t(1),
                       sc.dq, d);
      }
      for (int64_t r = 0; r < n; ++r) {
        scalar_t* dst = dq(t.b, t.heads[r], t.rows[r]);
        const acc_t* src = sc.dq + r * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(src[c]);
      }
    }
  });
  (void)ninf;
}

// ---------------------------------------------------------------- argument handling

struct Inputs {
  at::Tensor q, k, v;
  int64_t B, H, G, Sq, Sk, d;
};

Inputs check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, H, S, d], got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, "k and v must be 4-D [B, G, S, d], got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                    "q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()), "q must be floating point, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), d = q.size(3);
  const int64_t G = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B, "k has batch ", k.size(0), " but q has ", B);
  TORCH_CHECK_VALUE(k.size(3) == d, "k has head_dim ", k.size(3), " but q has ", d);
  // H = 0 passes the divisibility check (0 % G == 0) and then divides by H / G: refuse it here,
  // not only in the Python face, for callers of torch.ops.hecate directly.
  TORCH_CHECK_VALUE(H >= 1, "q ", q.sizes(), " has no query heads; attention needs at least one");
  TORCH_CHECK_VALUE(G >= 1 && H % G == 0, "the kv heads (", G, ") must divide the query heads (", H, ")");
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxHeadDim, "head_dim must be in [1, ", kMaxHeadDim, "], got ", d);
  return {last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), B, H, G, Sq, Sk, d};
}

Mask make_mask(const Inputs& in, bool causal, int64_t window, int64_t sinks,
               const std::optional<at::Tensor>& block_offsets, const std::optional<at::Tensor>& block_cols,
               int64_t block_size, at::Tensor& offsets_keep, at::Tensor& cols_keep) {
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK_VALUE(sinks >= 0, "sinks must be >= 0, got ", sinks);
  Mask mk;
  mk.causal = causal;
  mk.window = window;
  mk.sinks = sinks;
  mk.offset = in.Sk - in.Sq;
  mk.Sk = in.Sk;
  const bool has_list = block_offsets.has_value() && block_offsets->defined();
  TORCH_CHECK_VALUE(has_list == (block_cols.has_value() && block_cols->defined()),
                    "block_offsets and block_cols go together");
  if (!has_list) return mk;
  TORCH_CHECK_VALUE(block_size >= 1, "block_size must be >= 1 with a block list, got ", block_size);
  const int64_t nqb = (in.Sq + block_size - 1) / block_size, nkb = (in.Sk + block_size - 1) / block_size;
  offsets_keep = block_offsets->to(at::kLong).contiguous();
  cols_keep = block_cols->to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(offsets_keep.dim() == 2 && offsets_keep.size(0) == in.H && offsets_keep.size(1) == nqb + 1,
                    "block_offsets must have shape [H, ceil(Sq / block_size) + 1] = [", in.H, ", ",
                    nqb + 1, "], got ", offsets_keep.sizes());
  const int64_t* off = offsets_keep.data_ptr<int64_t>();
  const int64_t* cols = cols_keep.data_ptr<int64_t>();
  const int64_t nnz = cols_keep.numel();
  for (int64_t h = 0; h < in.H; ++h)
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t a = off[h * (nqb + 1) + qb], e = off[h * (nqb + 1) + qb + 1];
      TORCH_CHECK_VALUE(0 <= a && a <= e && e <= nnz, "block_offsets must be non-decreasing within [0, ",
                        nnz, "] per head, got ", a, "..", e, " at head ", h, " query block ", qb);
      for (int64_t i = a; i < e; ++i)
        TORCH_CHECK_VALUE(cols[i] >= 0 && cols[i] < nkb && (i == a || cols[i] > cols[i - 1]),
                          "block_cols of head ", h, " query block ", qb,
                          " must be strictly ascending key blocks in [0, ", nkb, ")");
    }
  mk.block_offsets = off;
  mk.block_cols = cols;
  mk.n_qblocks = nqb;
  return mk;
}

// Keys per tile: the block size of a block list, else smaller tiles under a sliding window.
int64_t key_tile(const Mask& mk, int64_t block_size) {
  if (block_size > 0) return block_size;
  return mk.window > 0 ? kTileKWindow : kTileK;
}

double resolve_scale(double scale, int64_t d) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(d));
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const Inputs& in, double scale, const Mask& mk) {
  Problem<scalar_t> pb;
  pb.B = in.B; pb.H = in.H; pb.G = in.G; pb.Sq = in.Sq; pb.Sk = in.Sk; pb.d = in.d;
  pb.scale = resolve_scale(scale, in.d);
  pb.mask = mk;
  pb.q = Rows<const scalar_t>(in.q);
  pb.k = Rows<const scalar_t>(in.k);
  pb.v = Rows<const scalar_t>(in.v);
  return pb;
}

#define HECATE_ATTENTION_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// A MoH problem: the dense problem plus the routing weights (in the accumulation type) and the
// query tiles of the selected (token, head) pairs; forward and backward build it alike.
template <typename scalar_t, typename acc_t>
Problem<scalar_t> make_moh_problem(const Inputs& in, double scale, const Mask& mk, const at::Tensor& idx,
                                   const at::Tensor& w) {
  auto pb = make_problem<scalar_t>(in, scale, mk);
  pb.K = idx.size(2);
  if constexpr (std::is_same_v<acc_t, double>) pb.weights64 = w.data_ptr<double>();
  else pb.weights = w.data_ptr<float>();
  add_moh_tiles(pb, idx.data_ptr<int64_t>(), pb.K);
  return pb;
}

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

std::tuple<at::Tensor, at::Tensor> finish_kv_grads(const at::Tensor& dk_acc, const at::Tensor& dv_acc,
                                                   const Inputs& in) {
  auto dk = dk_acc.size(0) == 1 ? dk_acc[0] : dk_acc.sum(0);
  auto dv = dv_acc.size(0) == 1 ? dv_acc[0] : dv_acc.sum(0);
  return {dk.to(in.k.scalar_type()), dv.to(in.v.scalar_type())};
}

int64_t kv_splits(const Inputs& in) {
  const int64_t groups = std::max<int64_t>(1, in.B * in.G);
  return std::max<int64_t>(1, (at::get_num_threads() + groups - 1) / groups);
}

// MoH routing tensors: head_idx [B, Sq, K] int64 (-1 = unused slot), head_weight [B, Sq, K].
void check_routing(const Inputs& in, const at::Tensor& idx, const at::Tensor& w) {
  TORCH_CHECK_VALUE(in.Sq == in.Sk, "moh_attention needs q and k of one length, got ", in.Sq, " and ", in.Sk);
  TORCH_CHECK_VALUE(idx.dim() == 3 && idx.size(0) == in.B && idx.size(1) == in.Sq,
                    "head_idx must have shape [B, S, K] = [", in.B, ", ", in.Sq, ", K], got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, "head_idx must be int64");
  TORCH_CHECK_VALUE(w.sizes() == idx.sizes(), "head_weight must have the shape of head_idx ", idx.sizes(),
                    ", got ", w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "head_weight must be floating point");
  const int64_t K = idx.size(2);
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < in.B * in.Sq; ++t)
    for (int64_t a = 0; a < K; ++a) {
      const int64_t h = p[t * K + a];
      TORCH_CHECK_VALUE(h >= -1 && h < in.H, "head_idx contains ", h, ", outside [-1, ", in.H, ")");
      for (int64_t c = 0; c < a && h >= 0; ++c)
        TORCH_CHECK_VALUE(p[t * K + c] != h, "head_idx selects head ", h, " twice for one token");
    }
}

}  // namespace

// ---------------------------------------------------------------- operators

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, double scale, bool causal,
    int64_t window, int64_t sinks, const std::optional<at::Tensor>& block_offsets,
    const std::optional<at::Tensor>& block_cols, int64_t block_size) {
  Inputs in = check_qkv(q_, k_, v_);
  at::Tensor off_keep, cols_keep;
  const Mask mk = make_mask(in, causal, window, sinks, block_offsets, block_cols, block_size, off_keep, cols_keep);
  const bool sparse = mk.block_offsets != nullptr;
  auto out = empty_bshd(in.B, in.H, in.Sq, in.d, in.q.options());
  auto lse = at::empty({in.B, in.H, in.Sq}, in.q.options().dtype(math_dtype(in.q.scalar_type())));
  HECATE_ATTENTION_TYPES(in.q.scalar_type(), "flash_attention_fwd", [&] {
    using acc_t = acc_of<scalar_t>;
    auto pb = make_problem<scalar_t>(in, scale, mk);
    add_flash_tiles(pb, sparse ? block_size : 0);
    forward<scalar_t, acc_t>(pb, key_tile(mk, sparse ? block_size : 0), Rows<scalar_t>(out), nullptr,
                             lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal, int64_t window, int64_t sinks,
    const std::optional<at::Tensor>& block_offsets, const std::optional<at::Tensor>& block_cols,
    int64_t block_size) {
  Inputs in = check_qkv(q_, k_, v_);
  TORCH_CHECK_VALUE(grad_out.sizes() == q_.sizes() && out.sizes() == q_.sizes(),
                    "grad_out and out must have q's shape ", q_.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({in.B, in.H, in.Sq}), "lse must have shape [B, H, Sq]");
  at::Tensor off_keep, cols_keep;
  const Mask mk = make_mask(in, causal, window, sinks, block_offsets, block_cols, block_size, off_keep, cols_keep);
  const bool sparse = mk.block_offsets != nullptr;
  const auto math = math_dtype(in.q.scalar_type());
  auto go = last_dim_contiguous(grad_out.to(in.q.scalar_type()));
  auto o = last_dim_contiguous(out);
  auto lse_c = lse.to(math).contiguous();
  auto dq = empty_bshd(in.B, in.H, in.Sq, in.d, in.q.options());
  const int64_t splits = kv_splits(in);
  auto dk_acc = at::zeros({splits, in.B, in.G, in.Sk, in.d}, in.q.options().dtype(math));
  auto dv_acc = at::zeros_like(dk_acc);
  HECATE_ATTENTION_TYPES(in.q.scalar_type(), "flash_attention_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    auto pb = make_problem<scalar_t>(in, scale, mk);
    add_flash_tiles(pb, sparse ? block_size : 0);
    backward<scalar_t, acc_t>(pb, key_tile(mk, sparse ? block_size : 0), Rows<const scalar_t>(go),
                              Rows<const scalar_t>(o), lse_c.data_ptr<acc_t>(), Rows<scalar_t>(dq),
                              dk_acc.data_ptr<acc_t>(), dv_acc.data_ptr<acc_t>(), nullptr, splits);
  });
  auto [dk, dv] = finish_kv_grads(dk_acc, dv_acc, in);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moh_attention_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& head_idx,
    const at::Tensor& head_weight, double scale, bool causal, int64_t window, int64_t sinks) {
  Inputs in = check_qkv(q_, k_, v_);
  auto idx = head_idx.contiguous();
  check_routing(in, idx, head_weight);
  at::Tensor off_keep, cols_keep;
  const Mask mk = make_mask(in, causal, window, sinks, std::nullopt, std::nullopt, 0, off_keep, cols_keep);
  const auto math = math_dtype(in.q.scalar_type());
  auto w = head_weight.to(math).contiguous();
  // Unselected (token, head) pairs stay 0 (lse -inf).
  auto out = at::zeros({in.B, in.Sq, in.H, in.d}, in.q.options()).transpose(1, 2);
  auto out_raw = at::zeros({in.B, in.Sq, in.H, in.d}, in.q.options()).transpose(1, 2);
  auto lse = at::full({in.B, in.H, in.Sq}, -std::numeric_limits<double>::infinity(), in.q.options().dtype(math));
  HECATE_ATTENTION_TYPES(in.q.scalar_type(), "moh_attention_fwd", [&] {
    using acc_t = acc_of<scalar_t>;
    auto pb = make_moh_problem<scalar_t, acc_t>(in, scale, mk, idx, w);
    Rows<scalar_t> raw(out_raw);
    forward<scalar_t, acc_t>(pb, key_tile(mk, 0), Rows<scalar_t>(out), &raw, lse.data_ptr<acc_t>());
  });
  return {out, out_raw, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& head_idx, const at::Tensor& head_weight, const at::Tensor& out_raw,
    const at::Tensor& lse, double scale, bool causal, int64_t window, int64_t sinks) {
  Inputs in = check_qkv(q_, k_, v_);
  auto idx = head_idx.contiguous();
  check_routing(in, idx, head_weight);
  TORCH_CHECK_VALUE(grad_out.sizes() == q_.sizes() && out_raw.sizes() == q_.sizes(),
                    "grad_out and out_raw must have q's shape ", q_.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({in.B, in.H, in.Sq}), "lse must have shape [B, H, Sq]");
  at::Tensor off_keep, cols_keep;
  const Mask mk = make_mask(in, causal, window, sinks, std::nullopt, std::nullopt, 0, off_keep, cols_keep);
  const auto math = math_dtype(in.q.scalar_type());
  auto w = head_weight.to(math).contiguous();
  auto go = last_dim_contiguous(grad_out.to(in.q.scalar_type()));
  auto o = last_dim_contiguous(out_raw);
  auto lse_c = lse.to(math).contiguous();
  // Rows of unselected pairs get no gradient: start from zeros.
  auto dq = at::zeros({in.B, in.Sq, in.H, in.d}, in.q.options()).transpose(1, 2);
  auto dw = at::zeros(idx.sizes(), in.q.options().dtype(math));
  const int64_t splits = kv_splits(in);
  auto dk_acc = at::zeros({splits, in.B, in.G, in.Sk, in.d}, in.q.options().dtype(math));
  auto dv_acc = at::zeros_like(dk_acc);
  HECATE_ATTENTION_TYPES(in.q.scalar_type(), "moh_attention_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    auto pb = make_moh_problem<scalar_t, acc_t>(in, scale, mk, idx, w);
    backward<scalar_t, acc_t>(pb, key_tile(mk, 0), Rows<const scalar_t>(go), Rows<const scalar_t>(o),
                              lse_c.data_ptr<acc_t>(), Rows<scalar_t>(dq), dk_acc.data_ptr<acc_t>(),
                              dv_acc.data_ptr<acc_t>(), dw.data_ptr<acc_t>(), splits);
  });
  auto [dk, dv] = finish_kv_grads(dk_acc, dv_acc, in);
  return {dq, dk, dv, dw.to(head_weight.scalar_type())};
}

}  // namespace hecate::cpu
