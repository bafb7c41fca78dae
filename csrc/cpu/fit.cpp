// fit_replicas: P1 fitted to bytes (hecate/parallel/fssdp/materialize.py, fit_holders) in one
// pass over the [W, E] counts instead of a dozen numpy calls.
//
// A replica of e on rank d saves 4 x tokens x token_bytes - cost bytes (cost = chunk bytes x
// chunk passes; the saving and the break-even count are fit_rule.h's). The policy's replicas
// are kept where they save; each rank's remaining slots (m minus the kept ones) go to the
// replicas that save the most (ties: the lower expert); if fixed_bytes > 0 and the summed
// saving does not exceed it, P1 = P0. The savings and their sums
// are computed with the same double operations, in the same order, as numpy's (numpy_sum.h),
// so the result is bit-identical (tests/test_fssdp_planner_kernels.py).
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fit_rule.h"
#include "numpy_sum.h"
#include "planner.h"

namespace hecate::cpu {
namespace planner {

template <class T>
void fit(const bool* h, bool* o, const int64_t* owner, const T* counts, int64_t W, int64_t E, int64_t cost,
         int64_t token_bytes, int64_t m, double fixed_bytes) {
  const double tb = static_cast<double>(token_bytes), c0 = static_cast<double>(cost);
  // At or below the break-even count nothing can pay (fit_rule.h): one comparison per cell
  // skips those, and the exact saving decides for the rest. In the counts' own type: an integer
  // count exceeds the threshold iff it exceeds its floor (no conversion per cell).
  T bound = std::numeric_limits<T>::lowest();
  if (has_break_even(cost, token_bytes)) {
    const double threshold = break_even_count(cost, token_bytes);
    if constexpr (std::is_integral_v<T>) {
      bound = break_even_floor(threshold);
    } else {
      bound = threshold;
    }
  }
  std::vector<int64_t> owned_by(E);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(owner[e] >= 0 && owner[e] < W, "owner_E entries must be ranks in [0, ", W, "), found ",
                      owner[e], " at expert ", e);
    o[owner[e] * E + e] = true;
    owned_by[e] = owner[e];
  }
  std::vector<double> held_saving;  // row-major, as numpy's saving[held]
  std::vector<double> kept_saving;  // by rank, then most saved first, as numpy's saving[keep]
  std::vector<std::pair<double, int64_t>> cand;
  std::vector<int64_t> above(E);  // a row's cells above the break-even, in expert order
  for (int64_t d = 0; d < W; ++d) {
    const T* row = counts + d * E;
    const bool* hold = h + d * E;
    // Most cells are below the break-even: find the others without a branch per cell.
    int64_t* __restrict ab = above.data();
    const T* __restrict r = row;
    int64_t n_above = 0;
    auto scan = [&](int64_t from, int64_t to) {
      for (int64_t e = from; e < to; ++e) {
        ab[n_above] = e;
        n_above += r[e] > bound;
      }
    };
    int64_t e0 = 0;
    if constexpr (std::is_integral_v<T>) {
      // Blocks of 16 cells with none above are skipped after one test: for counts and a bound
      // both >= 0, c > bound iff bound - c < 0, so the OR of the differences has its sign bit
      // set iff a cell is above (a subtraction and an OR per cell, which vectorize).
      if (bound >= 0) {
        for (; e0 + 16 <= E; e0 += 16) {
          T any = 0;
          for (int64_t i = 0; i < 16; ++i) any |= bound - r[e0 + i];
          if (any < 0) scan(e0, e0 + 16);
        }
      }
    }
    scan(e0, E);
    if (n_above == 0) continue;
    int64_t held = 0;
    cand.clear();
    for (int64_t i = 0; i < n_above; ++i) {
      const int64_t e = ab[i];
      const double saving = replica_saving(static_cast<double>(row[e]), tb, c0);
      if (!(saving > 0) || owned_by[e] == d) continue;
      if (hold[e]) {
        o[d * E + e] = true;
        held_saving.push_back(saving);
        ++held;
      } else {
        cand.emplace_back(saving, e);
      }
    }
    const int64_t free = m - held;
    if (free <= 0 || cand.empty()) continue;
    // Most saved first, then the lower expert (candidates come in expert order).
    std::stable_sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    const int64_t take = std::min<int64_t>(free, static_cast<int64_t>(cand.size()));
    for (int64_t i = 0; i < take; ++i) {
      o[d * E + cand[i].second] = true;
      kept_saving.push_back(cand[i].first);
    }
  }
  if (fixed_bytes > 0) {
    double saved = numpy_sum(held_saving.data(), static_cast<int64_t>(held_saving.size()));
    if (!kept_saving.empty()) saved += numpy_sum(kept_saving.data(), static_cast<int64_t>(kept_saving.size()));
    if (!(saved > fixed_bytes)) {  // the replicas would not repay their collectives: P1 = P0
      std::memset(o, 0, static_cast<size_t>(W * E));
      for (int64_t e = 0; e < E; ++e) o[owner[e] * E + e] = true;
    }
  }
}

template void fit<int64_t>(const bool*, bool*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, double);
template void fit<double>(const bool*, bool*, const int64_t*, const double*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, double);

}  // namespace planner

namespace {

at::Tensor fit_replicas(const at::Tensor& holders_WE, const at::Tensor& owner_E, const at::Tensor& counts_WE,
                        int64_t cost, int64_t token_bytes, int64_t m, double fixed_bytes) {
  TORCH_CHECK_VALUE(holders_WE.dim() == 2 && holders_WE.scalar_type() == at::kBool,
                    "holders_WE must be a 2-D bool tensor, got ", holders_WE.sizes(), " ", holders_WE.scalar_type());
  const int64_t W = holders_WE.size(0), E = holders_WE.size(1);
  TORCH_CHECK_VALUE(owner_E.dim() == 1 && owner_E.scalar_type() == at::kLong && owner_E.size(0) == E,
                    "owner_E must be a 1-D int64 tensor of ", E, " experts, got ", owner_E.sizes(), " ",
                    owner_E.scalar_type());
  TORCH_CHECK_VALUE(counts_WE.dim() == 2 && counts_WE.size(0) == W && counts_WE.size(1) == E &&
                        (counts_WE.scalar_type() == at::kLong || counts_WE.scalar_type() == at::kDouble),
                    "counts_WE must be an int64 or float64 tensor [W, E] = [", W, ", ", E, "], got ",
                    counts_WE.sizes(), " ", counts_WE.scalar_type());
  TORCH_CHECK_VALUE(m >= 1, "capacity_m must be >= 1, got ", m);
  auto hc = holders_WE.contiguous(), oc = owner_E.contiguous(), cc = counts_WE.contiguous();
  const bool* h = hc.const_data_ptr<bool>();
  const int64_t* owner = oc.const_data_ptr<int64_t>();
  auto out = at::zeros({W, E}, holders_WE.options());
  bool* o = out.mutable_data_ptr<bool>();
  if (cc.scalar_type() == at::kLong) {
    const int64_t* c = cc.const_data_ptr<int64_t>();
    int64_t sign = 0;  // OR of every count: negative iff one is (vectorizes, unlike a min of int64)
    for (int64_t i = 0; i < W * E; ++i) sign |= c[i];
    if (sign < 0) {
      TORCH_CHECK_VALUE(false, "counts_WE must be non-negative, found ", *std::min_element(c, c + W * E));
    }
    planner::fit(h, o, owner, c, W, E, cost, token_bytes, m, fixed_bytes);
    return out;
  }
  const double* c = cc.const_data_ptr<double>();
  bool finite = true;
  double lowest = 0;
  for (int64_t i = 0; i < W * E; ++i) {
    finite &= std::isfinite(c[i]);
    lowest = std::min(lowest, c[i]);
  }
  TORCH_CHECK_VALUE(finite, "counts_WE must be finite (found NaN or inf)");
  TORCH_CHECK_VALUE(lowest >= 0, "counts_WE must be non-negative, found ", lowest);
  planner::fit(h, o, owner, c, W, E, cost, token_bytes, m, fixed_bytes);
  return out;
}

}  // namespace
}  // namespace hecate::cpu

TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("fit_replicas(Tensor holders, Tensor owner, Tensor counts, int cost, int token_bytes, int m, "
        "float fixed_bytes) -> Tensor");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) { m.impl("fit_replicas", &hecate::cpu::fit_replicas); }
