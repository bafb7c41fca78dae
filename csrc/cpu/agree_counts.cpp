// agree_counts: what FullyShardedSparse._agree_on_counts (hecate/parallel/fssdp/strategy.py)
// reads off the all-gathered counts message, in one pass over it, instead of a dozen numpy
// calls (each 10-50 us in a training step, where the caches are cold after the big kernels):
//
//   table int64 [W * M], M = E + 1 + digest words: rank d's row is [counts (E) | non-MoE us | digest]
//   -> (counts_WE: a fresh int64 [W, E] copy, the largest non-MoE time, the first rank whose
//       digest differs from rank 0's (-1: they all agree), the largest count, the most bytes a
//       fit could save, whether the fit keeps no replica)
//
// With `owner_E` given, the last three are the fit's bound on these counts (fit_rule.h:
// most_saved, summed in numpy's order, and keeps_none with fixed_bytes), which
// FullyShardedSparse._agree_on_counts hands to plan(); without it they are (largest, 0.0, false).
//
// Also here: fit_bound (the bound of a [W, E] counts tensor alone: materialize.fit_bound) and
// fit_keeps_none (keeps_none on given values: the prefetch's bound over a window).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "fit_rule.h"

namespace hecate::cpu {
namespace {

const int64_t* owners_of(const at::Tensor& ow, int64_t W, int64_t E, at::Tensor& keep, const char* op) {
  TORCH_CHECK_VALUE(ow.dim() == 1 && ow.scalar_type() == at::kLong && ow.size(0) == E && ow.device().is_cpu(), op,
                    ": owner_E must be a 1-D CPU int64 tensor of ", E, " experts, got ", ow.sizes(), " ",
                    ow.scalar_type(), " on ", ow.device());
  keep = ow.contiguous();
  const int64_t* owner = keep.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(owner[e] >= 0 && owner[e] < W, op, ": owner_E entries must be ranks in [0, ", W,
                      "), found ", owner[e], " at expert ", e);
  }
  return owner;
}

std::tuple<at::Tensor, int64_t, int64_t, int64_t, double, bool> agree_counts(
    const at::Tensor& table, int64_t W, int64_t E, const std::optional<at::Tensor>& owner_E, int64_t token_bytes,
    int64_t cost, double fixed_bytes) {
  TORCH_CHECK_VALUE(W >= 1 && E >= 0, "agree_counts: W must be >= 1 and E >= 0, got W=", W, ", E=", E);
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.scalar_type() == at::kLong && table.numel() % W == 0,
                    "agree_counts: the gathered table must be a CPU int64 tensor of W x M values (W=", W,
                    "), got ", table.sizes(), " ", table.scalar_type(), " on ", table.device());
  const int64_t M = table.numel() / W;
  TORCH_CHECK_VALUE(M > E, "agree_counts: each rank's message has ", M, " words, fewer than the ", E,
                    " counts and the non-MoE time");
  auto tc = table.contiguous();
  const int64_t* msg = tc.const_data_ptr<int64_t>();
  auto counts = at::empty({W, E}, table.options());
  int64_t* out = counts.mutable_data_ptr<int64_t>();

  int64_t non_moe = std::numeric_limits<int64_t>::min(), bad = -1;
  int64_t top = std::numeric_limits<int64_t>::min();
  const int64_t D = M - E - 1;  // digest words
  for (int64_t d = 0; d < W; ++d) {
    const int64_t* row = msg + d * M;
    std::memcpy(out + d * E, row, sizeof(int64_t) * E);
    for (int64_t e = 0; e < E; ++e) top = std::max(top, row[e]);
    non_moe = std::max(non_moe, row[E]);
    if (bad < 0 && d > 0 && std::memcmp(row + E + 1, msg + E + 1, sizeof(int64_t) * D) != 0) bad = d;
  }

  double saving = 0.0;
  bool none = false;
  if (owner_E.has_value() && E > 0) {
    at::Tensor keep;
    const int64_t* owner = owners_of(*owner_E, W, E, keep, "agree_counts");
    saving = planner::most_saved(out, owner, W, E, top, token_bytes, cost);
    none = planner::keeps_none(top, saving, W * E, token_bytes, cost, fixed_bytes);
  }
  return {counts, non_moe, bad, top, saving, none};
}

std::tuple<int64_t, double> fit_bound(const at::Tensor& counts_WE, const at::Tensor& owner_E, int64_t token_bytes,
                                      int64_t cost) {
  TORCH_CHECK_VALUE(counts_WE.dim() == 2 && counts_WE.scalar_type() == at::kLong && counts_WE.device().is_cpu() &&
                        counts_WE.numel() > 0,
                    "fit_bound: counts_WE must be a non-empty 2-D CPU int64 tensor, got ", counts_WE.sizes(), " ",
                    counts_WE.scalar_type(), " on ", counts_WE.device());
  const int64_t W = counts_WE.size(0), E = counts_WE.size(1);
  at::Tensor keep;
  const int64_t* owner = owners_of(owner_E, W, E, keep, "fit_bound");
  auto cc = counts_WE.contiguous();
  const int64_t* c = cc.const_data_ptr<int64_t>();
  const int64_t top = *std::max_element(c, c + W * E);
  return {top, planner::most_saved(c, owner, W, E, top, token_bytes, cost)};
}

bool fit_keeps_none(int64_t max_count, double saved, int64_t cells, int64_t token_bytes, int64_t cost,
                    double fixed_bytes) {
  return planner::keeps_none(max_count, saved, cells, token_bytes, cost, fixed_bytes);
}

}  // namespace
}  // namespace hecate::cpu

// Planner-only op: a fragment of the hecate library (csrc/ops.cpp defines the shared schemas).
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("agree_counts(Tensor table, int W, int E, Tensor? owner, int token_bytes, int cost, float fixed_bytes) "
        "-> (Tensor, int, int, int, float, bool)");
  m.def("fit_bound(Tensor counts, Tensor owner, int token_bytes, int cost) -> (int, float)");
  // No tensor argument to dispatch on: the kernel is registered with the schema (catch-all).
  m.def("fit_keeps_none(int max_count, float saved, int cells, int token_bytes, int cost, float fixed_bytes) -> bool",
        &hecate::cpu::fit_keeps_none);
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) {
  m.impl("agree_counts", &hecate::cpu::agree_counts);
  m.impl("fit_bound", &hecate::cpu::fit_bound);
}

