// numpy's float64 summation, reproduced for the planner's C++ ops: every rank must compute the
// same plan with or without hecate._C, so a sum that decides a plan must round as numpy's does.
#pragma once

#include <cstdint>

namespace hecate::cpu {

// np.add.reduce of a contiguous float64 array: blocks of up to 128 summed with 8 accumulators,
// longer arrays halved at a multiple of 8 (numpy's pairwise summation). Additions only: no
// multiply-add for a compiler to contract.
inline double numpy_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = -0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_sum(a, n2) + numpy_sum(a + n2, n - n2);
}

}  // namespace hecate::cpu
