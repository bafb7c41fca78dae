// expert_histogram: entries per bin, ignoring negative (dropped / unrouted) entries.
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "ops.h"

namespace hecate::cpu {

at::Tensor expert_histogram(const at::Tensor& indices_TK, int64_t num_bins) {
  TORCH_CHECK_VALUE(indices_TK.scalar_type() == at::kLong, "indices_TK must be int64, got ",
                    indices_TK.scalar_type());
  TORCH_CHECK_VALUE(num_bins >= 1, "num_bins must be >= 1, got ", num_bins);
  auto flat = indices_TK.contiguous();
  const int64_t* idx = flat.const_data_ptr<int64_t>();
  const int64_t n = flat.numel();
  // One private count vector per task, summed at the end: no atomics in the hot loop.
  constexpr int64_t kGrain = 1 << 15;
  const int64_t tasks = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  std::vector<std::vector<int64_t>> partial(tasks, std::vector<int64_t>(num_bins, 0));
  std::vector<int64_t> bad(tasks, -1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      auto& counts = partial[task];
      const int64_t stop = std::min(n, (task + 1) * kGrain);
      for (int64_t i = task * kGrain; i < stop; ++i) {
        const int64_t b = idx[i];
        if (b < 0) continue;
        if (b >= num_bins) {
          bad[task] = b;
          continue;
        }
        ++counts[b];
      }
    }
  });
  for (int64_t b : bad)
    TORCH_CHECK_VALUE(b < 0, "indices_TK contains ", b, ", out of range for num_bins = ", num_bins);
  auto counts_B = at::zeros({num_bins}, indices_TK.options().dtype(at::kLong));
  int64_t* out = counts_B.mutable_data_ptr<int64_t>();
  for (const auto& counts : partial)
    for (int64_t b = 0; b < num_bins; ++b) out[b] += counts[b];
  return counts_B;
}

}  // namespace hecate::cpu
