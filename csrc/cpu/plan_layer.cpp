// plan_layer: one MoE layer's whole per-step FSSDP plan on one rank, in one call
// (hecate/parallel/fssdp/planner.py, plan_layer): the checked counts' per-expert totals (for
// the load predictor) -> P1 (Algorithm 1, or the caller's P1) -> P1 fitted to bytes -> this
// rank's token routes (sends, receives, splits) -> its spAG / spRS plan when P1 has replicas.
//
// Each stage is the code of its own op (planner.h), so the plan is bit-identical to calling
// place_experts, fit_replicas, route_layout and sparse_plan one after another, which in turn
// equal the numpy planners. What the fusion saves is the Python between them (a dozen
// tensor / numpy conversions and checks per stage) and three more passes over the counts:
// they are checked, summed per expert and (optionally) copied to float64 in a single pass.
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "planner.h"

namespace hecate::cpu {
namespace {

using Ints = std::vector<int64_t>;
using PlanLayerResult = std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, Ints, Ints, std::vector<at::Tensor>, Ints, Ints>;

// A 1-D int64 tensor's values as a list (returned to Python as a list: no tensor, no .tolist()).
Ints as_ints(const at::Tensor& t) {
  const int64_t* p = t.const_data_ptr<int64_t>();
  return Ints(p, p + t.numel());
}

// Algorithm 1's P1 when it is fitted right after: a buffer kept across calls (no [W, E] allocation).
bool* scratch_holders(int64_t cells) {
  thread_local std::unique_ptr<bool[]> buf;
  thread_local int64_t size = 0;
  if (size < cells) buf.reset(new bool[cells]), size = cells;
  std::fill(buf.get(), buf.get() + cells, false);
  return buf.get();
}

// Returns (holders_WE, H, counts_E, a copy of owner_E (the plan's P0), send_e, send_dst,
// send_tokens (by expert, then destination), recv_WE, send_splits, recv_splits, sparse,
// sparse_send_counts, sparse_recv_counts): sparse is plan_sparse's tensors but its two counts
// (send_ids, recv_ids, owned_ids, held_ids, send_rows, recv_rows, owned_rows_M) when `sparse`
// is set and P1 has replicas, else empty (and so are its counts). The splits and counts are
// int lists: what the Python plan keeps (no tensor to make and convert).
PlanLayerResult plan_layer(const at::Tensor& counts_WE, const at::Tensor& owner_E, const at::Tensor& node_W,
                           const std::optional<at::Tensor>& load_E, const std::optional<at::Tensor>& holders_WE,
                           int64_t m, int64_t t, bool fit, int64_t fit_cost, int64_t token_bytes,
                           double fixed_bytes, int64_t rank, bool sparse,
                           const std::optional<at::Tensor>& history_out) {
  TORCH_CHECK_VALUE(owner_E.dim() == 1 && owner_E.scalar_type() == at::kLong,
                    "owner_E must be a 1-D int64 tensor, got ", owner_E.sizes(), " ", owner_E.scalar_type());
  TORCH_CHECK_VALUE(node_W.dim() == 1 && node_W.scalar_type() == at::kLong,
                    "node_of_W must be a 1-D int64 tensor, got ", node_W.sizes(), " ", node_W.scalar_type());
  const int64_t W = node_W.size(0), E = owner_E.size(0);
  TORCH_CHECK_VALUE(counts_WE.dim() == 2 && counts_WE.scalar_type() == at::kLong && counts_WE.size(0) == W &&
                        counts_WE.size(1) == E,
                    "counts_WE must be an int64 tensor [W, E] = [", W, ", ", E, "], got ", counts_WE.sizes(), " ",
                    counts_WE.scalar_type());
  TORCH_CHECK_VALUE(rank >= 0 && rank < W, "rank must be in [0, ", W, "), got ", rank);
  TORCH_CHECK_VALUE(m >= 1, "capacity_m must be >= 1, got ", m);
  auto cc = counts_WE.contiguous(), oc = owner_E.contiguous(), nc = node_W.contiguous();
  const int64_t* cnt = cc.const_data_ptr<int64_t>();
  const int64_t* owner = oc.const_data_ptr<int64_t>();
  const int64_t* node = nc.const_data_ptr<int64_t>();
  const auto opts = counts_WE.options();

  // One pass over the counts: non-negative, per-expert totals; then the float64 copy.
  double* hist = nullptr;
  if (history_out.has_value()) {
    const at::Tensor& hcopy = *history_out;
    TORCH_CHECK_VALUE(hcopy.scalar_type() == at::kDouble && hcopy.is_contiguous() && hcopy.dim() == 2 &&
                          hcopy.size(0) == W && hcopy.size(1) == E,
                      "history_out must be a contiguous float64 tensor [W, E] = [", W, ", ", E, "]");
    hist = hcopy.mutable_data_ptr<double>();
  }
  auto counts_E = at::zeros({E}, opts);
  int64_t* __restrict tot = counts_E.mutable_data_ptr<int64_t>();
  int64_t sign = 0;  // OR of every count: negative iff one is (vectorizes, unlike a min of int64)
  for (int64_t d = 0; d < W; ++d) {
    const int64_t* __restrict row = cnt + d * E;
    for (int64_t e = 0; e < E; ++e) {
      sign |= row[e];
      tot[e] += row[e];
    }
  }
  if (sign < 0) {
    const int64_t lowest = *std::min_element(cnt, cnt + W * E);
    TORCH_CHECK_VALUE(false, "counts_WE must be non-negative, found ", lowest);
  }
  if (hist != nullptr) {  // only once checked: the runtime passes the history entry it will evict
    const int64_t* __restrict c = cnt;
    double* __restrict out = hist;
    if ((sign >> 52) == 0) {
      // Every count is in [0, 2^52): its double is 2^52 + c (c in the mantissa of 2^52's bits)
      // minus 2^52, exactly; an OR and a subtraction that vectorize, unlike an int64 -> double
      // conversion (a scalar one per count before AVX-512).
      constexpr uint64_t kTwo52Bits = 0x4330000000000000ull;
      constexpr double kTwo52 = 4503599627370496.0;
      for (int64_t i = 0; i < W * E; ++i)
        out[i] = std::bit_cast<double>(static_cast<uint64_t>(c[i]) | kTwo52Bits) - kTwo52;
    } else {
      for (int64_t i = 0; i < W * E; ++i) out[i] = static_cast<double>(c[i]);
    }
  }

  // P1: the caller's (an early, prefetched or other policy's P1), or Algorithm 1's.
  at::Tensor holders;
  const bool* p1 = nullptr;
  if (holders_WE.has_value()) {
    holders = *holders_WE;
    TORCH_CHECK_VALUE(holders.dim() == 2 && holders.scalar_type() == at::kBool && holders.size(0) == W &&
                          holders.size(1) == E,
                      "holders_WE must be a bool tensor [W, E] = [", W, ", ", E, "], got ", holders.sizes(), " ",
                      holders.scalar_type());
    holders = holders.contiguous();
    p1 = holders.const_data_ptr<bool>();
  } else {
    TORCH_CHECK_VALUE(load_E.has_value(), "plan_layer needs load_E (the predicted load) or holders_WE (P1)");
    const at::Tensor& load = *load_E;
    TORCH_CHECK_VALUE(load.dim() == 1 && load.scalar_type() == at::kDouble && load.size(0) == E,
                      "load_E must be a 1-D float64 tensor of ", E, " experts, got ", load.sizes(), " ",
                      load.scalar_type());
    TORCH_CHECK_VALUE(t >= 0, "the overlap degree t must be >= 0, got ", t);
    auto lc = load.contiguous();
    bool* placed = nullptr;
    if (fit) {
      placed = scratch_holders(W * E);
    } else {
      holders = at::zeros({W, E}, opts.dtype(at::kBool));
      placed = holders.mutable_data_ptr<bool>();
    }
    planner::place(placed, lc.const_data_ptr<double>(), owner, node, W, E, m, t);
    p1 = placed;
  }
  if (fit) {
    auto fitted = at::zeros({W, E}, opts.dtype(at::kBool));
    planner::fit(p1, fitted.mutable_data_ptr<bool>(), owner, cnt, W, E, fit_cost, token_bytes, m, fixed_bytes);
    holders = fitted;
  }
  const bool* h = holders.const_data_ptr<bool>();
  planner::Layout l = planner::route_layout(h, cnt, node, W, E, rank, opts);
  std::vector<at::Tensor> sp;
  Ints sp_send, sp_recv;
  if (sparse && l.H > E) {
    std::vector<at::Tensor> all = planner::sparse_plan(owner, h, W, E, rank, opts);
    sp_send = as_ints(all[1]), sp_recv = as_ints(all[3]);
    sp = {all[0], all[2], all[4], all[5], all[6], all[7], all[8]};
  }
  auto owner_copy = at::empty({E}, opts);
  std::copy(owner, owner + E, owner_copy.mutable_data_ptr<int64_t>());
  return {holders, l.H, counts_E, owner_copy, l.sends[0], l.sends[1], l.sends[2], l.recv_WE,
          as_ints(l.splits[0]), as_ints(l.splits[1]), std::move(sp), std::move(sp_send), std::move(sp_recv)};
}

}  // namespace
}  // namespace hecate::cpu

// Planner-only op: a fragment of the hecate library (csrc/ops.cpp defines the shared schemas).
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("plan_layer(Tensor counts, Tensor owner, Tensor node, Tensor? load, Tensor? holders, int m, int t, "
        "bool fit, int fit_cost, int token_bytes, float fixed_bytes, int rank, bool sparse, Tensor(a!)? history_out) "
        "-> (Tensor, int, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int[], int[], Tensor[], int[], int[])");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) { m.impl("plan_layer", &hecate::cpu::plan_layer); }
