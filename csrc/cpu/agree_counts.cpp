// agree_counts: what FullyShardedSparse._agree_on_counts (hecate/parallel/fssdp/strategy.py)
// reads off the all-gathered counts message, in one pass over it, instead of a dozen numpy
// calls (each 10-50 us in a training step, where the caches are cold after the big kernels):
//
//   table int64 [W * M], M = E + 1 + digest words: rank d's row is [counts (E) | non-MoE us | digest]
//   -> (counts_WE: a fresh int64 [W, E] copy, the largest non-MoE time, the first rank whose
//       digest differs from rank 0's (-1: they all agree), the largest count, the fit's bound,
//       whether that bound is exact)
//
// The bound is FullyShardedSparse._fit_bound's second value when `owner_E` is given: the sum,
// over the cells (d, e) whose rank d does not own e, of max(count * (4.0 * token_bytes) - cost,
// 0.0). numpy sums those by a dot product (BLAS: its own order of additions), so the sum here
// equals numpy's bit for bit only where no addition rounds: every term an integer-valued double
// and every partial sum below 2^53 (then any order gives the exact sum). `exact` says whether
// that holds (the largest count x 4 x token bytes, the cost and the total below 2^53); where it
// does not, the caller computes the bound with numpy. Like numpy, when no cell saves anything
// (4.0 * largest count * token bytes <= cost) the bound is 0.0 without a pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

namespace hecate::cpu {
namespace {

constexpr double kExact = 9007199254740992.0;  // 2^53: integers below it are exact doubles

std::tuple<at::Tensor, int64_t, int64_t, int64_t, double, bool> agree_counts(
    const at::Tensor& table, int64_t W, int64_t E, const std::optional<at::Tensor>& owner_E, int64_t token_bytes,
    int64_t cost) {
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
  bool exact = false;
  if (owner_E.has_value() && E > 0) {
    const at::Tensor& ow = *owner_E;
    TORCH_CHECK_VALUE(ow.dim() == 1 && ow.scalar_type() == at::kLong && ow.size(0) == E,
                      "agree_counts: owner_E must be a 1-D int64 tensor of ", E, " experts, got ", ow.sizes(), " ",
                      ow.scalar_type());
    auto oc = ow.contiguous();
    const int64_t* owner = oc.const_data_ptr<int64_t>();
    const double ftop = static_cast<double>(top), tb4 = 4.0 * static_cast<double>(token_bytes);
    const double fcost = static_cast<double>(cost);
    exact = token_bytes >= 0 && cost >= 0 && static_cast<double>(cost) < kExact && top >= 0 &&
            ftop < kExact && tb4 < kExact;
    if (exact && 4.0 * ftop * static_cast<double>(token_bytes) > fcost) {  // else no cell saves anything
      exact = ftop * tb4 < kExact;  // every count x 4 x token bytes is then an exact integer
      for (int64_t d = 0; d < W && exact; ++d) {
        const int64_t* row = out + d * E;
        for (int64_t e = 0; e < E; ++e) {
          const double s = static_cast<double>(row[e]) * tb4 - fcost;
          if (owner[e] != d && s > 0.0) saving += s;
        }
      }
      exact = exact && saving < kExact;
    }
  }
  return {counts, non_moe, bad, top, exact ? saving : 0.0, exact};
}

}  // namespace
}  // namespace hecate::cpu

// Planner-only op: a fragment of the hecate library (csrc/ops.cpp defines the shared schemas).
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("agree_counts(Tensor table, int W, int E, Tensor? owner, int token_bytes, int cost) "
        "-> (Tensor, int, int, int, float, bool)");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) { m.impl("agree_counts", &hecate::cpu::agree_counts); }
