// permute: counting sort of token rows by destination bin, with optional per-bin capacity.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "common.h"
#include "ops.h"

namespace hecate::cpu {
namespace {

// Marks the (t, k) entries kept under `capacity`, by GShard position: every token's 1st choice
// before any 2nd choice, lower token first within one choice.
void keep_by_position(const int64_t* bins, int64_t T, int64_t K, int64_t num_bins, int64_t capacity,
                      std::vector<uint8_t>& kept) {
  std::vector<int64_t> taken(num_bins, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = t * K + k, b = bins[i];
      if (b >= 0 && taken[b] < capacity) {
        ++taken[b];
        kept[i] = 1;
      }
    }
}

// Marks the `capacity` highest-priority entries of each bin (ties: lower flat index = lower
// token, then lower k).
void keep_by_priority(const int64_t* bins, const double* priority, int64_t n, int64_t num_bins,
                      int64_t capacity, std::vector<uint8_t>& kept) {
  // Bucket the entries by bin (stable), then select within each over-full bin in parallel.
  std::vector<int64_t> start(num_bins + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (bins[i] >= 0) ++start[bins[i] + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<int64_t> members(start[num_bins]);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    if (bins[i] >= 0) members[cursor[bins[i]]++] = i;
  at::parallel_for(0, num_bins, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto first = members.begin() + start[b], last = members.begin() + start[b + 1];
      if (last - first > capacity) {
        std::nth_element(first, first + capacity, last, [&](int64_t i, int64_t j) {
          return priority[i] > priority[j] || (priority[i] == priority[j] && i < j);
        });
        last = first + capacity;
      }
      for (auto it = first; it != last; ++it) kept[*it] = 1;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(
    const at::Tensor& x_TD, const at::Tensor& bins_TK, int64_t num_bins, int64_t capacity,
    const std::optional<at::Tensor>& priority_TK) {
  TORCH_CHECK_VALUE(x_TD.dim() == 2, "x_TD must be 2-D, got ", x_TD.sizes());
  TORCH_CHECK_VALUE(bins_TK.dim() == 2 && bins_TK.size(0) == x_TD.size(0),
                    "bins_TK must have shape (", x_TD.size(0), ", K), got ", bins_TK.sizes());
  TORCH_CHECK_VALUE(bins_TK.scalar_type() == at::kLong, "bins_TK must be int64");
  TORCH_CHECK_VALUE(num_bins >= 1, "num_bins must be >= 1, got ", num_bins);
  const int64_t T = bins_TK.size(0), K = bins_TK.size(1), D = x_TD.size(1), n = T * K;
  auto x = x_TD.contiguous();
  auto bins_c = bins_TK.contiguous();
  const int64_t* bins = bins_c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(bins[i] < num_bins, "bins_TK contains ", bins[i],
                      ", out of range for num_bins = ", num_bins);

  // 1. Which entries survive, and how many land in each bin.
  std::vector<uint8_t> kept(n, 0);
  if (capacity < 0) {
    for (int64_t i = 0; i < n; ++i) kept[i] = bins[i] >= 0;
  } else if (!priority_TK.has_value() || !priority_TK->defined()) {
    keep_by_position(bins, T, K, num_bins, capacity, kept);
  } else {
    TORCH_CHECK_VALUE(priority_TK->sizes() == bins_TK.sizes(), "priority_TK must have shape ",
                      bins_TK.sizes(), ", got ", priority_TK->sizes());
    auto priority = priority_TK->to(at::kDouble).contiguous();
    keep_by_priority(bins, priority.const_data_ptr<double>(), n, num_bins, capacity, kept);
  }
  auto counts_B = at::zeros({num_bins}, bins_TK.options());
  int64_t* counts = counts_B.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (kept[i]) ++counts[bins[i]];

  // 2. Stable scatter: rows ordered by bin, then by flat (t, k) index.
  std::vector<int64_t> cursor(num_bins);
  std::exclusive_scan(counts, counts + num_bins, cursor.begin(), int64_t{0});
  const int64_t N = num_bins ? cursor[num_bins - 1] + counts[num_bins - 1] : 0;
  auto row_map_TK = at::empty({T, K}, bins_TK.options());
  int64_t* row_map = row_map_TK.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) row_map[i] = kept[i] ? cursor[bins[i]]++ : -1;

  // 3. Copy: each token row is read once and written to its (up to K) destinations.
  auto x_ND = at::empty({N, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(x_ND.mutable_data_ptr());
  at::parallel_for(0, T, rows_grain(row_bytes * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_map[t * K + k];
        if (r >= 0) std::memcpy(dst + r * row_bytes, src + t * row_bytes, row_bytes);
      }
  });
  return {x_ND, row_map_TK, counts_B};
}

}  // namespace hecate::cpu
