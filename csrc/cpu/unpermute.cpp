// unpermute (weighted gather-sum of expert rows back to tokens) and its fused backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace hecate::cpu {
namespace {

void check_row_map(const at::Tensor& row_map_TK, int64_t N) {
  TORCH_CHECK_VALUE(row_map_TK.dim() == 2 && row_map_TK.scalar_type() == at::kLong,
                    "row_map_TK must be a 2-D int64 tensor, got ", row_map_TK.sizes(), " ",
                    row_map_TK.scalar_type());
  const int64_t* rows = row_map_TK.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < row_map_TK.numel(); ++i)
    TORCH_CHECK_VALUE(rows[i] < N, "row_map_TK contains ", rows[i], ", out of range for the ", N,
                      " rows of y_ND");
}

// Weights as a contiguous acc_t tensor (or undefined): they are small (T x K).
at::Tensor weights_as(const std::optional<at::Tensor>& weights_TK, const at::Tensor& row_map_TK,
                      at::ScalarType acc) {
  if (!weights_TK.has_value() || !weights_TK->defined()) return {};
  TORCH_CHECK_VALUE(weights_TK->sizes() == row_map_TK.sizes(), "weights_TK must have shape ",
                    row_map_TK.sizes(), ", got ", weights_TK->sizes());
  return weights_TK->to(acc).contiguous();
}

template <typename scalar_t, typename acc_t>
void unpermute_rows(const scalar_t* y, const int64_t* row_map, const acc_t* weights, int64_t T,
                    int64_t K, int64_t D, scalar_t* out) {
  at::parallel_for(0, T, rows_grain(D * sizeof(scalar_t) * K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(std::is_same_v<scalar_t, acc_t> ? 0 : D);
    for (int64_t t = begin; t < end; ++t) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        // Full-precision dtype: accumulate straight into the output row.
        scalar_t* o = out + t * D;
        bool first = true;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = row_map[t * K + k];
          if (r < 0) continue;
          const acc_t w = weights ? weights[t * K + k] : acc_t(1);
          const scalar_t* src = y + r * D;
          if (first) {
            for (int64_t d = 0; d < D; ++d) o[d] = w * src[d];
          } else {
            for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
          }
          first = false;
        }
        if (first)
          for (int64_t d = 0; d < D; ++d) o[d] = 0;
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t* a = acc.data();
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = row_map[t * K + k];
          if (r < 0) continue;
          const acc_t w = weights ? weights[t * K + k] : acc_t(1);
          const scalar_t* src = y + r * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(src[d]);
        }
        scalar_t* o = out + t * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void unpermute_backward_rows(const scalar_t* grad, const scalar_t* y, const int64_t* row_map,
                             const acc_t* weights, int64_t T, int64_t K, int64_t D,
                             scalar_t* grad_y, acc_t* grad_weights) {
  at::parallel_for(0, T, rows_grain(D * sizeof(scalar_t) * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* g = grad + t * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = t * K + k, r = row_map[i];
        if (r < 0) {
          if (grad_weights) grad_weights[i] = 0;
          continue;
        }
        const acc_t w = weights ? weights[i] : acc_t(1);
        scalar_t* gy = grad_y + r * D;
        for (int64_t d = 0; d < D; ++d) gy[d] = static_cast<scalar_t>(w * static_cast<acc_t>(g[d]));
        if (grad_weights) {
          const scalar_t* yr = y + r * D;
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(g[d]) * static_cast<acc_t>(yr[d]);
          grad_weights[i] = dot;
        }
      }
    }
  });
}

}  // namespace

at::Tensor unpermute(const at::Tensor& y_ND, const at::Tensor& row_map_TK,
                     const std::optional<at::Tensor>& weights_TK) {
  TORCH_CHECK_VALUE(y_ND.dim() == 2, "y_ND must be 2-D, got ", y_ND.sizes());
  auto y = y_ND.contiguous();
  auto row_map = row_map_TK.contiguous();
  check_row_map(row_map, y.size(0));
  const int64_t T = row_map.size(0), K = row_map.size(1), D = y.size(1);
  auto out_TD = at::empty({T, D}, y.options());
  const auto acc = math_dtype(y.scalar_type());
  auto weights = weights_as(weights_TK, row_map, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_rows<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(),
                                    weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr,
                                    T, K, D, out_TD.mutable_data_ptr<scalar_t>());
  });
  return out_TD;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(
    const at::Tensor& grad_TD, const at::Tensor& y_ND, const at::Tensor& row_map_TK,
    const std::optional<at::Tensor>& weights_TK, bool need_grad_weights) {
  TORCH_CHECK_VALUE(y_ND.dim() == 2, "y_ND must be 2-D, got ", y_ND.sizes());
  auto y = y_ND.contiguous();
  auto row_map = row_map_TK.contiguous();
  check_row_map(row_map, y.size(0));
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y.size(0), D = y.size(1);
  TORCH_CHECK_VALUE(grad_TD.dim() == 2 && grad_TD.size(0) == T && grad_TD.size(1) == D,
                    "grad_TD must have shape (", T, ", ", D, "), got ", grad_TD.sizes());
  auto grad = grad_TD.to(y.scalar_type()).contiguous();
  const auto acc = math_dtype(y.scalar_type());
  auto weights = weights_as(weights_TK, row_map, acc);

  // Each row of y may be referenced once (so that rows can be written in parallel without
  // races); rows referenced by no entry get a zero gradient.
  const int64_t* rows = row_map.const_data_ptr<int64_t>();
  std::vector<uint8_t> referenced(N, 0);
  int64_t num_referenced = 0;
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t r = rows[i];
    if (r < 0) continue;
    TORCH_CHECK_VALUE(!referenced[r], "row_map_TK references row ", r,
                      " of y_ND more than once; unpermute_backward needs a permutation");
    referenced[r] = 1;
    ++num_referenced;
  }
  auto grad_y_ND = at::empty({N, D}, y.options());
  if (num_referenced < N) {
    char* base = static_cast<char*>(grad_y_ND.mutable_data_ptr());
    const int64_t row_bytes = D * y.element_size();
    for (int64_t r = 0; r < N; ++r)
      if (!referenced[r]) std::memset(base + r * row_bytes, 0, row_bytes);
  }
  at::Tensor grad_weights;
  const bool want_weights = need_grad_weights && weights.defined();
  if (want_weights) grad_weights = at::empty({T, K}, y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_backward_rows<scalar_t, acc_t>(
        grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rows,
        weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr, T, K, D,
        grad_y_ND.mutable_data_ptr<scalar_t>(),
        want_weights ? grad_weights.mutable_data_ptr<acc_t>() : nullptr);
  });
  if (want_weights) grad_weights = grad_weights.to(weights_TK->scalar_type());
  return {grad_y_ND, grad_weights};
}

}  // namespace hecate::cpu
