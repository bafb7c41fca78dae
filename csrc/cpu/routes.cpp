// route_layout and destination_bins: one rank's side of the FSSDP token routes
// (hecate/parallel/fssdp/routes.py, TokenRoutes.layout) and the bins of its routed entries
// (hecate/parallel/fssdp/strategy.py, _host_bins), in one pass each.
//
// The Python versions are a few dozen numpy calls on arrays of E to W x E cells; at the
// world sizes of one node (W <= 64) those calls' fixed costs are most of a layer's plan.
// Both are integer-only, so the results are bit-identical to the Python ones (tests in
// tests/test_fssdp_planner_kernels.py compare them on random cases).
#include <torch/library.h>

#include <cstdlib>

#include <bit>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "planner.h"

namespace hecate::cpu {
namespace {

// Holders of each expert as ranks ascending (CSR over experts) and per (expert, node) counts.
struct HolderIndex {
  int64_t W = 0, E = 0, N = 0, H = 0;
  std::vector<int64_t> ptr;    // [E + 1]
  std::vector<int64_t> ranks;  // [H]
  std::vector<int64_t> node_cnt;  // [E * N]
};

void check_routes_inputs(const at::Tensor& holders, const at::Tensor& counts, const at::Tensor& node) {
  TORCH_CHECK_VALUE(holders.dim() == 2 && holders.scalar_type() == at::kBool,
                    "holders_WE must be a 2-D bool tensor, got ", holders.sizes(), " ", holders.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.scalar_type() == at::kLong,
                    "counts_WE must be a 2-D int64 tensor, got ", counts.sizes(), " ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.sizes() == holders.sizes(), "counts_WE has shape ", counts.sizes(),
                    " but holders_WE has ", holders.sizes());
  TORCH_CHECK_VALUE(node.dim() == 1 && node.scalar_type() == at::kLong && node.size(0) == holders.size(0),
                    "node_of_W must be a 1-D int64 tensor of ", holders.size(0), " ranks, got ",
                    node.sizes(), " ", node.scalar_type());
}

HolderIndex index_holders(const bool* h, const int64_t* cnt, const int64_t* node, int64_t W, int64_t E) {
  HolderIndex ix;
  ix.W = W, ix.E = E;
  for (int64_t d = 0; d < W; ++d) {
    TORCH_CHECK_VALUE(node[d] >= 0 && node[d] < W, "node_of_W[", d, "] = ", node[d], " is not a node in [0, ",
                      W, ")");
    ix.N = std::max(ix.N, node[d] + 1);
  }
  // P1 is sparse (owners plus a few replicas): one scan lists its cells row by row, skipping
  // 8 empty cells at a time, and the index is made from the list (no second scan, no division).
  thread_local std::vector<int64_t> cell_d, cell_e;
  cell_d.clear(), cell_e.clear();
  ix.ptr.assign(E + 1, 0);
  int64_t* ptr = ix.ptr.data();
  for (int64_t d = 0; d < W; ++d) {
    const bool* row = h + d * E;
    auto hold = [&](int64_t x) { cell_d.push_back(d), cell_e.push_back(x), ++ptr[x + 1]; };
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      uint64_t word;
      std::memcpy(&word, row + e, 8);
      while (word) {  // its nonzero bytes (true cells), lowest first
        const int k = std::countr_zero(word) >> 3;
        hold(e + k);
        word &= ~(uint64_t{0xFF} << (8 * k));
      }
    }
    for (; e < E; ++e)
      if (row[e]) hold(e);
  }
  for (int64_t e = 0; e < E; ++e) ptr[e + 1] += ptr[e];
  ix.H = ptr[E];
  ix.ranks.resize(ix.H);
  ix.node_cnt.assign(E * ix.N, 0);
  std::vector<int64_t> fill(ix.ptr.begin(), ix.ptr.end() - 1);
  for (int64_t i = 0; i < ix.H; ++i) {  // row-major: ranks ascending within each expert
    const int64_t d = cell_d[i], e = cell_e[i];
    ix.ranks[fill[e]++] = d;
    ++ix.node_cnt[e * ix.N + node[d]];
  }
  for (int64_t e = 0; e < E; ++e) {
    if (ix.ptr[e + 1] > ix.ptr[e]) continue;
    for (int64_t s = 0; s < W; ++s) {
      TORCH_CHECK_VALUE(cnt[s * E + e] <= 0, "holders_WE has no holder of expert ", e, " but rank ", s,
                        " routes ", cnt[s * E + e], " tokens to it; every expert needs at least its owner "
                        "in holders_WE");
    }
  }
  return ix;
}

inline int64_t share_of(int64_t c, int64_t n, int64_t pos, int64_t src, int64_t e) {
  // Even share of c tokens over n replicas; the c % n remainder tokens go to the positions
  // [off, off + r) (circular) with off = (src + e) % n, as routes.TokenRoutes._split.
  if (n == 1) return c;  // most groups: the owner alone (no division)
  const int64_t q = c / n, r = c % n, off = (src + e) % n;
  int64_t rel = pos - off;  // pos and off are in [0, n)
  if (rel < 0) rel += n;
  return q + (rel < r ? 1 : 0);
}

// Returns (holders H, send_e, send_dst, send_tokens, recv_WE, send_splits, recv_splits); with
// rank = -1 only the holders are indexed and checked (every routed expert has a holder).
// check_counts: also check that no count is negative (once per routes, at construction).
std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_layout(
    const at::Tensor& holders_WE, const at::Tensor& counts_WE, const at::Tensor& node_W, int64_t rank,
    bool check_counts) {
  check_routes_inputs(holders_WE, counts_WE, node_W);
  const int64_t W = holders_WE.size(0), E = holders_WE.size(1);
  TORCH_CHECK_VALUE(rank >= -1 && rank < W, "rank must be in [0, ", W, "), got ", rank);
  auto hc = holders_WE.contiguous();
  auto cc = counts_WE.contiguous();
  auto nc = node_W.contiguous();
  const int64_t* cnt = cc.const_data_ptr<int64_t>();
  if (check_counts) {
    int64_t sign = 0;  // OR of every count: negative iff one is (vectorizes, unlike a min of int64)
    for (int64_t i = 0; i < W * E; ++i) sign |= cnt[i];
    if (sign < 0) {
      TORCH_CHECK_VALUE(false, "counts_WE must be non-negative, found ", *std::min_element(cnt, cnt + W * E));
    }
  }
  planner::Layout l = planner::route_layout(hc.const_data_ptr<bool>(), cnt, nc.const_data_ptr<int64_t>(), W, E,
                                            rank, counts_WE.options());
  if (rank < 0) {
    auto none = at::empty({0}, counts_WE.options());
    return {l.H, none, none, none, none, none, none};
  }
  return {l.H, l.sends[0], l.sends[1], l.sends[2], l.recv_WE, l.splits[0], l.splits[1]};
}

// Destination bins' pass 1 (below): bins[j] = lookup[indices[j]] (lookup[E] for an index < 0 or
// >= E), the positions j whose bin is kSplit listed in order in `at` (room for n + 8), and
// the count of indices < 0, of listed positions, and whether an index is >= E.
constexpr int64_t kSplit = -2;
struct Pass1 {
  int64_t dropped = 0, split = 0;
  bool out_of_range = false;
};

Pass1 lookup_pass_scalar(const int64_t* __restrict in, const int64_t* __restrict lk, int64_t* __restrict bo,
                         int64_t* __restrict at, int64_t from, int64_t n, int64_t E, Pass1 r) {
  // restrict: the stores into the bins and the list cannot change the indices or the lookup,
  // so the loop keeps every pointer and count in registers.
  int64_t dropped_n = r.dropped, split_n = r.split;
  bool over_any = r.out_of_range;
  for (int64_t j = from; j < n; ++j) {
    const int64_t x = in[j];
    const bool dropped = x < 0, over = x >= E;
    over_any |= over;
    dropped_n += dropped;
    const int64_t b = lk[(dropped | over) ? E : x];
    bo[j] = b;
    at[split_n] = j;
    split_n += b == kSplit;
  }
  return {dropped_n, split_n, over_any};
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HECATE_BINS_AVX512 1
// The same pass, 8 entries at a time with AVX-512 (a gather for the lookups, a compress for
// the list), for the CPUs that have it (chosen at run time; the same integers either way).
__attribute__((target("avx512f"))) Pass1 lookup_pass_avx512(const int64_t* __restrict in,
                                                             const int64_t* __restrict lk, int64_t* __restrict bo,
                                                             int64_t* __restrict at, int64_t n, int64_t E) {
  const __m512i vE = _mm512_set1_epi64(E), vsplit = _mm512_set1_epi64(kSplit), vzero = _mm512_setzero_si512();
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t dropped_n = 0, split_n = 0;
  unsigned over_any = 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i x = _mm512_loadu_si512(in + j);
    const __mmask8 neg = _mm512_cmplt_epi64_mask(x, vzero), over = _mm512_cmpge_epi64_mask(x, vE);
    const __m512i b = _mm512_mask_i64gather_epi64(vzero, 0xFF, _mm512_mask_mov_epi64(x, neg | over, vE), lk, 8);
    _mm512_storeu_si512(bo + j, b);
    const __mmask8 split = _mm512_cmpeq_epi64_mask(b, vsplit);
    _mm512_storeu_si512(at + split_n, _mm512_maskz_compress_epi64(split, _mm512_add_epi64(iota, _mm512_set1_epi64(j))));
    split_n += __builtin_popcount(split);
    dropped_n += __builtin_popcount(neg);
    over_any |= over;
  }
  return lookup_pass_scalar(in, lk, bo, at, j, n, E, {dropped_n, split_n, over_any != 0});
}
#endif

Pass1 lookup_pass(const int64_t* in, const int64_t* lk, int64_t* bo, int64_t* at, int64_t n, int64_t E) {
#ifdef HECATE_BINS_AVX512
  // HECATE_DISABLE_AVX512 (any value) runs the scalar pass on every CPU: what a CPU without
  // AVX-512 runs, testable on one that has it (tests/test_fssdp_planner_bins.py).
  static const bool avx512 = __builtin_cpu_supports("avx512f") && std::getenv("HECATE_DISABLE_AVX512") == nullptr;
  if (avx512) return lookup_pass_avx512(in, lk, bo, at, n, E);
#endif
  return lookup_pass_scalar(in, lk, bo, at, 0, n, E, {});
}

// bin = dst * E + e of every routed entry (-1 for dropped ones, index < 0): the entries of an
// expert, in token order, fill its send cells' shares in the cells' (destination) order.
at::Tensor destination_bins(const at::Tensor& indices, const at::Tensor& send_e, const at::Tensor& send_dst,
                            const at::Tensor& send_tokens, int64_t E, int64_t rank) {
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  for (const auto* t : {&send_e, &send_dst, &send_tokens}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong && t->size(0) == send_e.size(0),
                      "send_e, send_dst and send_tokens must be 1-D int64 tensors of one length");
  }
  TORCH_CHECK_VALUE(E >= 1, "num_experts must be >= 1, got ", E);
  auto ic = indices.contiguous();
  auto ec = send_e.contiguous(), dc = send_dst.contiguous(), tc = send_tokens.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t* ce = ec.const_data_ptr<int64_t>();
  const int64_t* cd = dc.const_data_ptr<int64_t>();
  const int64_t* ct = tc.const_data_ptr<int64_t>();
  const int64_t S = send_e.size(0), n = indices.numel();
  // Per expert: its bin when all of its entries go to one cell (destination), kSplit when
  // they fill several cells' shares, -1 when the plan routes none of its entries. A split
  // expert fills its cells in order: `bin` is the current cell's, `left` the entries it still
  // takes, `cur` / `stop` the cell's index and the expert's end in the send lists.
  std::vector<int64_t> lookup(E, -1), bin(E, -1), left(E, 0), cur(E, 0), stop(E, 0);
  int64_t routed = 0, split_tokens = 0;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t e = ce[i];
    TORCH_CHECK_VALUE(e >= 0 && e < E, "send_e[", i, "] = ", e, " is not an expert in [0, ", E, ")");
    TORCH_CHECK_VALUE(i == 0 || e >= ce[i - 1], "send_e must be sorted by expert");
    routed += ct[i];
    if (lookup[e] == -1) {
      lookup[e] = cd[i] * E + e, cur[e] = i;
    } else {
      lookup[e] = kSplit;
    }
    stop[e] = i + 1;
  }
  int64_t n_split_experts = 0, last_split = -1;
  bool shares_nonneg = true;  // a plan's are: then runs (pass 2) fill them as the general loop does
  for (int64_t e = 0; e < E; ++e) {
    if (lookup[e] != kSplit) continue;
    ++n_split_experts, last_split = e;
    for (int64_t i = cur[e]; i < stop[e]; ++i) split_tokens += ct[i], shares_nonneg &= ct[i] >= 0;
    left[e] = ct[cur[e]], bin[e] = cd[cur[e]] * E + e;
  }
  auto out = at::empty(indices.sizes(), indices.options());
  int64_t* bins = out.mutable_data_ptr<int64_t>();
  // Pass 1, without branches on the entries (whether an entry's expert is split is random
  // from one entry to the next, so a branch would be mispredicted often): every entry gets
  // its expert's lookup (-1 for dropped and out-of-range ones: lookup[E]), and the positions
  // of the split experts' entries are appended to a list, in token order.
  lookup.push_back(-1);
  thread_local std::vector<int64_t> split_at;
  if (static_cast<int64_t>(split_at.size()) < n + 8) split_at.resize(n + 8);  // + 8: whole-vector stores
  int64_t* sp = split_at.data();
  const Pass1 p1 = lookup_pass(idx, lookup.data(), bins, sp, n, E);
  const int64_t n_dropped = p1.dropped, n_split = p1.split;
  const bool out_of_range = p1.out_of_range;
  if (out_of_range) {
    int64_t bad = 0;
    while (idx[bad] < E) ++bad;
    TORCH_CHECK_VALUE(false, "indices has expert ", idx[bad], " but the layer has ", E, " experts");
  }
  const int64_t n_valid = n - n_dropped;
  // Pass 2: the split experts' entries fill their cells' shares one after another.
  int64_t overflow_e = -1;
  const bool runs = n_split_experts == 1 && shares_nonneg;
  if (runs) {
    // One split expert (the usual case: the rank's hot expert): its listed entries, in order,
    // take its cells' shares as runs, a store each (no per-entry state to carry); entries
    // past its last cell get -1, as below.
    const int64_t x = last_split;
    int64_t s = 0;
    for (int64_t c = cur[x]; c < stop[x] && s < n_split; ++c) {
      const int64_t b = cd[c] * E + x, end = std::min(n_split, s + ct[c]);
      for (; s < end; ++s) bins[sp[s]] = b;
    }
    if (s < n_split) overflow_e = x;
    for (; s < n_split; ++s) bins[sp[s]] = -1;
  }
  for (int64_t s = 0; !runs && s < n_split; ++s) {
    const int64_t j = sp[s], x = idx[j];
    if (left[x] == 0) {  // this cell's share is full: the next cell with tokens
      int64_t c = cur[x] + 1;
      while (c < stop[x] && ct[c] == 0) ++c;
      if (c == stop[x]) {
        overflow_e = x;
        bins[j] = -1;
        continue;
      }
      cur[x] = c, left[x] = ct[c], bin[x] = cd[c] * E + x;
    }
    --left[x];
    bins[j] = bin[x];
  }
  TORCH_CHECK(routed == n_valid, "fssdp destination bins: the plan routes ", routed, " entries of rank ", rank,
              " but it has ", n_valid, "; the all-gathered counts disagree with the local routing");
  TORCH_CHECK(n_split == split_tokens, "fssdp destination bins: rank ", rank, " has ", n_split,
              " entries of the experts its plan splits over several ranks, but the plan routes ", split_tokens,
              "; the all-gathered counts disagree with the local routing");
  TORCH_CHECK(overflow_e < 0, "fssdp destination bins: rank ", rank, " has more entries of expert ", overflow_e,
              " than its plan routes; the all-gathered counts disagree with the local routing");
  return out;
}

}  // namespace

namespace planner {

Layout route_layout(const bool* h, const int64_t* cnt, const int64_t* node, int64_t W, int64_t E, int64_t rank,
                    const at::TensorOptions& opts) {
  const HolderIndex ix = index_holders(h, cnt, node, W, E);
  planner::Layout out;
  out.H = ix.H;
  if (rank < 0) return out;
  const int64_t me = node[rank], N = ix.N;
  // Sends, sorted by (expert, destination): kept tokens, or the even shares of the group
  // that serves this rank (its node's holders of e if any, else every holder of e).
  std::vector<int64_t> se, sd, st;
  se.reserve(E + 16), sd.reserve(E + 16), st.reserve(E + 16);
  const int64_t* row = cnt + rank * E;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = row[e];
    if (c <= 0) continue;
    if (h[rank * E + e]) {
      se.push_back(e), sd.push_back(rank), st.push_back(c);
      continue;
    }
    const bool by_node = ix.node_cnt[e * N + me] > 0;
    const int64_t n = by_node ? ix.node_cnt[e * N + me] : ix.ptr[e + 1] - ix.ptr[e];
    int64_t pos = 0;
    for (int64_t k = ix.ptr[e]; k < ix.ptr[e + 1]; ++k) {
      const int64_t d = ix.ranks[k];
      if (by_node && node[d] != me) continue;
      se.push_back(e), sd.push_back(d), st.push_back(share_of(c, n, pos++, rank, e));
    }
  }
  // Receives [W_src, E] for the experts this rank holds; per-peer splits [2, W]: sends, receives.
  auto recv = at::zeros({W, E}, opts);
  auto splits = at::zeros({2, W}, opts);
  int64_t* rv = recv.mutable_data_ptr<int64_t>();
  int64_t* ss = splits.mutable_data_ptr<int64_t>();
  int64_t* rs = ss + W;
  for (int64_t e = 0; e < E; ++e) {
    if (!h[rank * E + e]) continue;
    // This rank's position in its node's group and in the all-holders group of e.
    int64_t pos_node = 0, pos_all = 0;
    for (int64_t k = ix.ptr[e]; k < ix.ptr[e + 1] && ix.ranks[k] != rank; ++k) {
      ++pos_all;
      pos_node += node[ix.ranks[k]] == me;
    }
    const int64_t n_node = ix.node_cnt[e * N + me], n_all = ix.ptr[e + 1] - ix.ptr[e];
    for (int64_t s = 0; s < W; ++s) {
      const int64_t c = cnt[s * E + e];
      int64_t v = 0;
      if (s == rank) {
        v = c;
      } else if (h[s * E + e] || c <= 0) {
        v = 0;  // the source keeps its tokens (or has none)
      } else if (node[s] == me) {
        v = share_of(c, n_node, pos_node, s, e);
      } else if (ix.node_cnt[e * N + node[s]] == 0) {
        v = share_of(c, n_all, pos_all, s, e);
      }
      rv[s * E + e] = v;
      rs[s] += v;
    }
  }
  // Sends [3, S]: expert, destination, tokens.
  const int64_t S = static_cast<int64_t>(se.size());
  auto sends = at::empty({3, S}, opts);
  int64_t* sp = sends.mutable_data_ptr<int64_t>();
  std::copy(se.begin(), se.end(), sp);
  std::copy(sd.begin(), sd.end(), sp + S);
  std::copy(st.begin(), st.end(), sp + 2 * S);
  for (int64_t i = 0; i < S; ++i) ss[sd[i]] += st[i];
  out.sends = sends, out.recv_WE = recv, out.splits = splits;
  return out;
}

}  // namespace planner
}  // namespace hecate::cpu

// Planner-only ops: a fragment of the hecate library (csrc/ops.cpp defines the shared schemas).
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("route_layout(Tensor holders, Tensor counts, Tensor node, int rank, bool check_counts=False) -> "
        "(int, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("destination_bins(Tensor indices, Tensor send_e, Tensor send_dst, Tensor send_tokens, int num_experts, "
        "int rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) {
  m.impl("route_layout", &hecate::cpu::route_layout);
  m.impl("destination_bins", &hecate::cpu::destination_bins);
}
