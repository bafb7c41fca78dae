// The byte fit's rule (materialize.fit_holders) in one place for every C++ op that applies it or
// bounds it: fit_replicas (fit.cpp, the fit itself), agree_counts (agree_counts.cpp, the bound
// on the gathered counts) and fit_keeps_none (the same file, the bound over a window's counts,
// which FullyShardedSparse._prefetch_plan asks for). Python's twin, for builds without
// hecate._C, is materialize.py's (replica_savings, break_even_count, fit_bound,
// fit_keeps_none); tests/test_fssdp_fit_rule.py checks the two give the same doubles.
//
// A replica of expert e on rank d saves 4 x count x token_bytes - cost bytes: d's tokens of e
// no longer cross 4 times (dispatch, combine and their backward), the chunk crosses `cost`
// bytes' worth (chunk bytes x chunk passes).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "numpy_sum.h"

namespace hecate::cpu::planner {

// numpy_sum of the n values from index start of an array that is never stored: fill(start, n,
// out) writes up to 128 of them, or returns false when they are all +0.0 (their numpy_sum,
// then 0.0 without a pass). The same splits and leaves as numpy_sum, so the same double.
template <class Fill>
double numpy_sum_by(const Fill& fill, int64_t start, int64_t n) {
  if (n <= 128) {
    double leaf[128];
    return fill(start, n, leaf) ? numpy_sum(leaf, n) : 0.0;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_sum_by(fill, start, n2) + numpy_sum_by(fill, start + n2, n - n2);
}

// The saving of one cell, rounded as numpy's `4 * count * token_bytes - cost` (float64):
// volatile keeps the product rounded before the subtraction (a fused multiply-add, which some
// targets' default contraction would emit, rounds once). 4 x count is exact, so the order of
// the two products does not matter.
inline double replica_saving(double count, double token_bytes, double cost) {
  volatile double bytes = 4.0 * count * token_bytes;
  return bytes - cost;
}

// The break-even count: a cell whose count is at or below it saves nothing. Defined only when
// token_bytes > 0 and cost > 0 (has_break_even); lowered by 1e-9 relative, far beyond the
// rounding of replica_saving, so that no cell it rules out could have saved.
inline bool has_break_even(int64_t cost, int64_t token_bytes) { return token_bytes > 0 && cost > 0; }
inline double break_even_count(int64_t cost, int64_t token_bytes) {
  return static_cast<double>(cost) / (4.0 * static_cast<double>(token_bytes)) * (1 - 1e-9);
}
// The same test for integer counts: count > threshold iff count > floor(threshold).
inline int64_t break_even_floor(double threshold) {
  return threshold >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(std::floor(threshold));
}

// The most bytes any fit of any P1 to counts [W, E] (int64, non-negative) can save: the sum of
// every positive saving over the cells a replica could take (not the owner's). Summed as
// numpy's np.add.reduce sums the [W * E] array of those savings (0.0 at the owners' cells and
// wherever nothing is saved), in its pairwise order, so the Python twin's sum is the same double.
// `top` is the largest count; when even it saves nothing, the sum is 0.0 without a pass.
inline double most_saved(const int64_t* counts, const int64_t* owner, int64_t W, int64_t E, int64_t top,
                         int64_t token_bytes, int64_t cost) {
  const double tb = static_cast<double>(token_bytes), c0 = static_cast<double>(cost);
  if (W * E == 0 || !(replica_saving(static_cast<double>(top), tb, c0) > 0.0)) return 0.0;
  // Cells at or below the break-even save nothing: an integer comparison rules them out, and
  // the saving is computed for the others only.
  const int64_t floor_even = has_break_even(cost, token_bytes)
                                 ? break_even_floor(break_even_count(cost, token_bytes))
                                 : std::numeric_limits<int64_t>::min();
  // numpy's pairwise summation over the virtual array, its leaves (<= 128 values) filled here:
  // the cells above the break-even found without a branch per cell, then their savings.
  auto fill = [&](int64_t start, int64_t n, double* out) {
    const int64_t* c = counts + start;
    int64_t above[128], k = 0;
    for (int64_t i = 0; i < n; ++i) {
      above[k] = i;
      k += c[i] > floor_even;
    }
    if (k == 0) return false;
    std::fill(out, out + n, 0.0);
    int64_t d = start / E, e = start - d * E, at = 0;  // the cell of index `at`, walked forward
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = above[j];
      for (e += i - at, at = i; e >= E; e -= E) ++d;
      if (owner[e] == d) continue;
      const double s = replica_saving(static_cast<double>(c[i]), tb, c0);
      if (s > 0.0) out[i] = s;
    }
    return true;
  };
  return numpy_sum_by(fill, 0, W * E);
}

// Whether fitting any P1 to counts whose largest cell is max_count and whose replicas could
// save most_saved bytes at most (most_saved, or a mean of them over a window) returns P0:
// every cell is at or below the break-even (the fit's own prefilter), or the most the replicas
// could save does not repay the collectives they add (fixed_bytes), with margins far above the
// rounding of the fit's sums (relative) and savings (absolute, per cell: `cells` of them).
inline bool keeps_none(int64_t max_count, double saved, int64_t cells, int64_t token_bytes, int64_t cost,
                       double fixed_bytes) {
  if (has_break_even(cost, token_bytes) && max_count <= break_even_floor(break_even_count(cost, token_bytes)))
    return true;
  volatile double per_cell = 4.0 * static_cast<double>(max_count) * static_cast<double>(token_bytes);
  volatile double scale = 1e-15 * static_cast<double>(cells);
  volatile double slack = scale * (per_cell + static_cast<double>(cost));
  return fixed_bytes > 0 && saved + slack <= fixed_bytes * (1 - 1e-9);
}

}  // namespace hecate::cpu::planner
