// place_copies: the copy-by-copy loop of Algorithm 1 (hecate/parallel/fssdp/materialize.py,
// HecatePolicy.place). Python spends ~1.5 us per copy on it, and a 1024-rank world places
// 2048 copies per layer per step; here the same picks take a few microseconds in all.
//
// Exactly the Python loop: experts in `order`; each takes `quota[e]` copies, each on the free
// rank (a slot left, not the owner) first by (its node lacks e, expected tokens, used slots,
// rank). Within one expert that is: the best free rank of each node lacking e in key order,
// then the best remaining free ranks. The keys are compared and updated with the same double
// additions in the same order as Python's floats, so the picks are bit-identical.
#include <torch/library.h>

#include <set>
#include <tuple>
#include <vector>

#include "common.h"

namespace hecate::cpu {
namespace {

struct Key {
  double dev;  // expected tokens
  int64_t used;
  int64_t rank;
  bool operator<(const Key& o) const { return std::tie(dev, used, rank) < std::tie(o.dev, o.used, o.rank); }
};

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
  const int64_t* quota = quota_c.const_data_ptr<int64_t>();
  const double* share = share_c.const_data_ptr<double>();
  std::vector<double> dev(dev_c.const_data_ptr<double>(), dev_c.const_data_ptr<double>() + W);
  std::vector<int64_t> used(W, 0);
  int64_t num_nodes = 0;
  for (int64_t d = 0; d < W; ++d) {
    TORCH_CHECK_VALUE(node[d] >= 0 && node[d] < W, "node_W[", d, "] = ", node[d], " is out of range");
    num_nodes = std::max(num_nodes, node[d] + 1);
  }
  std::set<Key> ready;
  for (int64_t d = 0; d < W; ++d) ready.insert({dev[d], 0, d});
  std::vector<int64_t> node_mark(num_nodes, -1), rank_mark(W, -1), picks_d, picks_e;
  std::vector<Key> picked;
  for (int64_t i = 0; i < order.size(0); ++i) {
    const int64_t e = ord[i];
    TORCH_CHECK_VALUE(e >= 0 && e < E, "order[", i, "] = ", e, " is not an expert");
    const int64_t q = quota[e], o = owner[e];
    if (q == 0 || ready.empty()) break;  // sorted by quota first; or no slot left anywhere
    picked.clear();
    node_mark[node[o]] = i;  // the owner's node has the expert
    for (const Key& key : ready) {  // 1: the best free rank of each node lacking e
      if (static_cast<int64_t>(picked.size()) == q) break;
      if (key.rank != o && node_mark[node[key.rank]] != i) {
        picked.push_back(key);
        node_mark[node[key.rank]] = i;
      }
    }
    if (static_cast<int64_t>(picked.size()) < q) {  // 2: the best remaining free ranks
      for (const Key& key : picked) rank_mark[key.rank] = i;
      for (const Key& key : ready) {
        if (static_cast<int64_t>(picked.size()) == q) break;
        if (key.rank != o && rank_mark[key.rank] != i) picked.push_back(key);
      }
    }
    for (const Key& key : picked) {
      const int64_t d = key.rank;
      ready.erase(key);
      dev[d] += share[e];
      used[d] += 1;
      if (used[d] < m) ready.insert({dev[d], used[d], d});
      picks_d.push_back(d);
      picks_e.push_back(e);
    }
  }
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    auto t = at::empty({static_cast<int64_t>(v.size())}, owner_E.options());
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
    return t;
  };
  return {as_tensor(picks_d), as_tensor(picks_e)};
}

}  // namespace
}  // namespace hecate::cpu

// A fragment of the hecate library (csrc/ops.cpp defines the rest): this op is only used by
// the planner, so it registers itself here rather than in the shared schema list.
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("place_copies(Tensor dev_load, Tensor node, Tensor owner, Tensor order, Tensor quota, "
        "Tensor share, int m) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) { m.impl("place_copies", &hecate::cpu::place_copies); }
