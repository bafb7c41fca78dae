// Algorithm 1 of the paper (hecate/parallel/fssdp/materialize.py, HecatePolicy.place):
//   place_copies: its copy-by-copy loop alone (the Python fallback's twin);
//   place_experts: the whole of it (top-t, or the proportional quota, the expected tokens per
//   copy and the copy loop) in one call, returning P1 as bool [W, E].
// Python spends ~1.5 us per copy on the loop, and the quota and ordering around it are a dozen
// numpy calls whose fixed costs dominate a small world's plan; here they take microseconds.
//
// The copy loop: experts in `order`; each takes `quota[e]` copies, each on the free rank (a slot
// left, not the owner) first by (its node lacks e, expected tokens, used slots, rank). Within one
// expert that is: the best free rank of each node lacking e in key order, then the best
// remaining free ranks. Keys are compared and updated with the same double additions in the
// same order as Python's floats, and the quota reproduces numpy's rounding (its pairwise sum),
// so the picks are bit-identical (tests/test_fssdp_planner_sparse.py and
// tests/test_fssdp_planner_kernels.py compare them).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "common.h"
#include "numpy_sum.h"
#include "planner.h"

namespace hecate::cpu {
namespace {

struct Key {
  double dev;  // expected tokens
  int64_t used;
  int64_t rank;
  bool operator<(const Key& o) const {
    if (dev != o.dev) return dev < o.dev;
    if (used != o.used) return used < o.used;
    return rank < o.rank;
  }
};

// The free ranks in key order. Keys only grow (a pick adds expected tokens and a used slot), so
// a pick leaves a stale key behind in `base` and its new key goes to the short sorted `extra`;
// both are merged back into `base` once either grows past ~sqrt(W). Walking the free ranks is a
// two-way merge that skips stale keys (key.used != used[rank]); stale keys at the front of
// `base` (the ranks picked last, as picks come first in key order) are dropped for good.
// Both lists end with a sentinel key (after every real key, never stale: rank W, whose `used`
// is its own), so the merge needs no bounds checks.
class FreeRanks {
 public:
  FreeRanks(const std::vector<double>& dev, int64_t m) : used_(dev.size() + 1, 0), m_(m) {
    const int64_t W = static_cast<int64_t>(dev.size());
    sentinel_ = {std::numeric_limits<double>::infinity(), std::numeric_limits<int64_t>::max(), W};
    used_[W] = sentinel_.used;
    base_.reserve(W + 1);
    for (int64_t d = 0; d < W; ++d) base_.push_back({dev[d], 0, d});
    std::sort(base_.begin(), base_.end());
    base_.push_back(sentinel_);
    extra_.push_back(sentinel_);
    live_ = W;
    limit_ = std::max<int64_t>(16, static_cast<int64_t>(std::sqrt(static_cast<double>(W))));
  }
  bool empty() const { return live_ == 0; }

  // Calls fn(key) on the live keys in order until it returns false.
  template <class Fn>
  void walk(Fn&& fn) {
    while (stale(base_[head_])) ++head_;
    const Key* b = base_.data() + head_;
    const Key* x = extra_.data();
    while (true) {
      while (stale(*b)) ++b;
      while (stale(*x)) ++x;
      const Key* k;
      if (*b < *x) {
        k = b++;
      } else {
        if (x->rank == sentinel_.rank) return;  // both at their sentinels
        k = x++;
      }
      if (!fn(*k)) return;
    }
  }

  // Rank d took a copy: its key becomes (dev, used + 1), or it leaves when its slots are full.
  void take(int64_t d, double dev) {
    ++stale_;
    if (++used_[d] < m_) {
      Key k{dev, used_[d], d};
      extra_.insert(std::upper_bound(extra_.begin(), extra_.end() - 1, k), k);
    } else {
      --live_;
    }
  }

  void settle() {
    if (stale_ < limit_ && static_cast<int64_t>(extra_.size()) <= limit_) return;
    merged_.clear();
    walk([&](const Key& k) {
      merged_.push_back(k);
      return true;
    });
    merged_.push_back(sentinel_);
    base_.swap(merged_);
    extra_.assign(1, sentinel_);
    head_ = 0;
    stale_ = 0;
  }

 private:
  bool stale(const Key& k) const { return k.used != used_[k.rank]; }
  std::vector<Key> base_, extra_, merged_;
  std::vector<int64_t> used_;  // [W + 1]: the sentinel's last
  Key sentinel_{};
  size_t head_ = 0;
  int64_t m_, live_ = 0, stale_ = 0, limit_ = 16;
};

// The copies of Algorithm 1, as (rank, expert) pairs in placement order; `dev` is updated.
void copy_loop(std::vector<double>& dev, const int64_t* node, int64_t num_nodes, const int64_t* owner,
               const std::vector<int64_t>& order, const int64_t* quota, const double* share, int64_t m,
               std::vector<int64_t>& picks_d, std::vector<int64_t>& picks_e) {
  const int64_t W = static_cast<int64_t>(dev.size());
  FreeRanks ready(dev, m);
  std::vector<int64_t> node_mark(num_nodes, -1), rank_mark(W, -1), picked;
  for (size_t i = 0; i < order.size(); ++i) {
    const int64_t e = order[i], q = quota[e], o = owner[e], mark = static_cast<int64_t>(i);
    if (q == 0 || ready.empty()) break;  // sorted by quota first; or no slot left anywhere
    picked.clear();
    node_mark[node[o]] = mark;  // the owner's node has the expert
    // 1: the best free rank of each node lacking e. It ends once every node has e (nothing
    // further could be picked), not after a walk over all the free ranks.
    const int64_t picks_1 = std::min(q, num_nodes - 1);
    if (picks_1 > 0) {
      ready.walk([&](const Key& key) {
        if (node_mark[node[key.rank]] != mark) {  // never the owner: its node is marked
          picked.push_back(key.rank);
          node_mark[node[key.rank]] = mark;
          rank_mark[key.rank] = mark;
        }
        return static_cast<int64_t>(picked.size()) < picks_1;
      });
    }
    if (static_cast<int64_t>(picked.size()) < q) {  // 2: the best remaining free ranks
      ready.walk([&](const Key& key) {
        if (key.rank != o && rank_mark[key.rank] != mark) {
          picked.push_back(key.rank);
          rank_mark[key.rank] = mark;
        }
        return static_cast<int64_t>(picked.size()) < q;
      });
    }
    for (int64_t d : picked) {
      dev[d] += share[e];
      ready.take(d, dev[d]);
      picks_d.push_back(d);
      picks_e.push_back(e);
    }
    ready.settle();
  }
}

at::Tensor as_tensor(const std::vector<int64_t>& v, const at::TensorOptions& opts) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, opts);
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
  return t;
}

std::tuple<at::Tensor, at::Tensor> place_copies(const at::Tensor& dev_load_W, const at::Tensor& node_W,
                                                const at::Tensor& owner_E, const at::Tensor& order,
                                                const at::Tensor& quota_E, const at::Tensor& share_E,
                                                int64_t m) {
  TORCH_CHECK_VALUE(dev_load_W.dim() == 1 && dev_load_W.scalar_type() == at::kDouble,
                    "dev_load_W must be a 1-D float64 tensor");
  TORCH_CHECK_VALUE(share_E.dim() == 1 && share_E.scalar_type() == at::kDouble,
                    "share_E must be a 1-D float64 tensor");
  for (const auto* t : {&node_W, &owner_E, &order, &quota_E}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong, "place_copies takes 1-D int64 "
                      "node_W, owner_E, order and quota_E");
  }
  const int64_t W = dev_load_W.size(0), E = owner_E.size(0);
  TORCH_CHECK_VALUE(node_W.size(0) == W, "node_W must have ", W, " entries");
  TORCH_CHECK_VALUE(quota_E.size(0) == E && share_E.size(0) == E, "quota_E and share_E must have ", E,
                    " entries");
  TORCH_CHECK_VALUE(m >= 1, "m must be >= 1, got ", m);
  auto dev_c = dev_load_W.contiguous();
  auto node_c = node_W.contiguous(), owner_c = owner_E.contiguous(), order_c = order.contiguous();
  auto quota_c = quota_E.contiguous(), share_c = share_E.contiguous();
  const int64_t* node = node_c.const_data_ptr<int64_t>();
  const int64_t* owner = owner_c.const_data_ptr<int64_t>();
  const int64_t* ord = order_c.const_data_ptr<int64_t>();
  std::vector<int64_t> ord_v(ord, ord + order.size(0));
  for (size_t i = 0; i < ord_v.size(); ++i)
    TORCH_CHECK_VALUE(ord_v[i] >= 0 && ord_v[i] < E, "order[", i, "] = ", ord_v[i], " is not an expert");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(owner[e] >= 0 && owner[e] < W, "owner_E[", e, "] = ", owner[e], " is not a rank");
  std::vector<double> dev(dev_c.const_data_ptr<double>(), dev_c.const_data_ptr<double>() + W);
  std::vector<int64_t> picks_d, picks_e;
  copy_loop(dev, node, planner::count_nodes(node, W), owner, ord_v, quota_c.const_data_ptr<int64_t>(),
            share_c.const_data_ptr<double>(), m, picks_d, picks_e);
  return {as_tensor(picks_d, owner_E.options()), as_tensor(picks_e, owner_E.options())};
}

// materialize.proportional_quota: `total` slots in proportion to load, at most `cap` each
// (water-filling), rounded by the largest remainder (ties: lower expert).
std::vector<int64_t> proportional_quota(const double* load, int64_t E, int64_t total, int64_t cap) {
  std::vector<int64_t> quota(E, 0), base(E), order(E);
  std::vector<char> active(E);
  std::vector<double> share(E), frac(E), vals;
  int64_t n_active = 0;
  for (int64_t e = 0; e < E; ++e) n_active += (active[e] = load[e] > 0);
  int64_t remaining = std::min(total, cap * n_active);
  while (remaining > 0 && n_active > 0) {
    vals.clear();
    for (int64_t e = 0; e < E; ++e)
      if (active[e]) vals.push_back(load[e]);
    const double sum = numpy_sum(vals.data(), static_cast<int64_t>(vals.size()));
    const double rem = static_cast<double>(remaining);
    int64_t n_over = 0;
    for (int64_t e = 0; e < E; ++e) {
      share[e] = active[e] ? rem * load[e] / sum : 0.0;
      n_over += active[e] && share[e] >= static_cast<double>(cap);
    }
    if (n_over) {
      for (int64_t e = 0; e < E; ++e) {
        if (active[e] && share[e] >= static_cast<double>(cap)) {
          quota[e] = cap;
          active[e] = 0;
        }
      }
      remaining -= cap * n_over;
      n_active -= n_over;
      continue;
    }
    int64_t floors = 0;
    for (int64_t e = 0; e < E; ++e) {
      base[e] = static_cast<int64_t>(std::floor(share[e]));
      if (active[e]) floors += base[e];
      frac[e] = active[e] ? share[e] - static_cast<double>(base[e]) : -1.0;
    }
    const int64_t leftover = remaining - floors;
    // order[:leftover] as a Python slice (a negative leftover drops that many from the end) of
    // the experts by fraction (descending), ties by the lower expert: a total order, so its
    // first `take` experts are one set, which a selection finds without sorting all E.
    const int64_t take = leftover >= 0 ? std::min(leftover, E) : std::max<int64_t>(E + leftover, 0);
    if (take > 0 && take < E) {
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + (take - 1), order.end(), [&](int64_t a, int64_t b) {
        return frac[a] != frac[b] ? frac[a] > frac[b] : a < b;
      });
      for (int64_t i = 0; i < take; ++i) ++base[order[i]];
    } else if (take == E) {
      for (int64_t e = 0; e < E; ++e) ++base[e];
    }
    for (int64_t e = 0; e < E; ++e)
      if (active[e]) quota[e] = base[e];
    break;
  }
  return quota;
}

at::Tensor place_experts(const at::Tensor& load_E, const at::Tensor& owner_E, const at::Tensor& node_W,
                         int64_t m, int64_t t) {
  TORCH_CHECK_VALUE(load_E.dim() == 1 && load_E.scalar_type() == at::kDouble, "load_E must be a 1-D float64 tensor");
  TORCH_CHECK_VALUE(owner_E.dim() == 1 && owner_E.scalar_type() == at::kLong && owner_E.size(0) == load_E.size(0),
                    "owner_E must be a 1-D int64 tensor of ", load_E.size(0), " experts");
  TORCH_CHECK_VALUE(node_W.dim() == 1 && node_W.scalar_type() == at::kLong, "node_W must be a 1-D int64 tensor");
  TORCH_CHECK_VALUE(m >= 1 && t >= 0, "m must be >= 1 and t >= 0, got m=", m, " t=", t);
  const int64_t W = node_W.size(0), E = load_E.size(0);
  auto lc = load_E.contiguous(), oc = owner_E.contiguous(), nc = node_W.contiguous();
  auto holders = at::zeros({W, E}, load_E.options().dtype(at::kBool));
  planner::place(holders.mutable_data_ptr<bool>(), lc.const_data_ptr<double>(), oc.const_data_ptr<int64_t>(),
                 nc.const_data_ptr<int64_t>(), W, E, m, t);
  return holders;
}

}  // namespace

namespace planner {

int64_t count_nodes(const int64_t* node, int64_t W) {
  int64_t num_nodes = 0;
  for (int64_t d = 0; d < W; ++d) {
    TORCH_CHECK_VALUE(node[d] >= 0 && node[d] < W, "node_W[", d, "] = ", node[d], " is out of range");
    num_nodes = std::max(num_nodes, node[d] + 1);
  }
  return num_nodes;
}

void place(bool* h, const double* load, const int64_t* owner, const int64_t* node, int64_t W, int64_t E,
           int64_t m, int64_t t) {
  const int64_t num_nodes = count_nodes(node, W);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(owner[e] >= 0 && owner[e] < W, "owner_E[", e, "] = ", owner[e], " is not a rank");
    h[owner[e] * E + e] = true;
  }
  if (t <= m) {  // the top-t experts (load > 0; ties: lower expert) on every rank
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return load[a] > load[b]; });
    for (int64_t i = 0, taken = 0; i < E && taken < t; ++i) {
      const int64_t e = order[i];
      if (!(load[e] > 0)) break;
      ++taken;
      for (int64_t d = 0; d < W; ++d) h[d * E + e] = true;
    }
    return;
  }
  const std::vector<int64_t> quota = proportional_quota(load, E, W * m, W - 1);
  std::vector<double> share(E), dev(W, 0.0);
  for (int64_t e = 0; e < E; ++e) share[e] = load[e] / static_cast<double>(quota[e] + 1);
  for (int64_t e = 0; e < E; ++e) dev[owner[e]] += share[e];  // np.add.at: in expert order
  // By quota, then load (both descending), then expert: sorted as packed keys (a total order,
  // so the same order as the stable sort by quota and load it stands for).
  struct Rank1 {
    int64_t quota;
    double load;
    int64_t e;
  };
  std::vector<Rank1> keys;
  keys.reserve(E);
  for (int64_t e = 0; e < E; ++e)
    if (quota[e] > 0) keys.push_back({quota[e], load[e], e});
  std::sort(keys.begin(), keys.end(), [](const Rank1& a, const Rank1& b) {
    if (a.quota != b.quota) return a.quota > b.quota;
    if (a.load != b.load) return a.load > b.load;
    return a.e < b.e;
  });
  std::vector<int64_t> order(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) order[i] = keys[i].e;
  std::vector<int64_t> picks_d, picks_e;
  copy_loop(dev, node, num_nodes, owner, order, quota.data(), share.data(), m, picks_d, picks_e);
  for (size_t i = 0; i < picks_d.size(); ++i) h[picks_d[i] * E + picks_e[i]] = true;
}

}  // namespace planner
}  // namespace hecate::cpu

// A fragment of the hecate library (csrc/ops.cpp defines the rest): these ops are only used by
// the planner, so they register themselves here rather than in the shared schema list.
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("place_copies(Tensor dev_load, Tensor node, Tensor owner, Tensor order, Tensor quota, "
        "Tensor share, int m) -> (Tensor, Tensor)");
  m.def("place_experts(Tensor load, Tensor owner, Tensor node, int m, int t) -> Tensor");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) {
  m.impl("place_copies", &hecate::cpu::place_copies);
  m.impl("place_experts", &hecate::cpu::place_experts);
}
