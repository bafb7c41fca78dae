// topk_gating: scores (softmax / sigmoid), top-k selection and weights, fused per token row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace hecate::cpu {
namespace {

constexpr double kRenormEps = 1e-20;  // same clamp as hecate/ops/reference.py

template <typename scalar_t, typename acc_t>
void gating_rows(const scalar_t* logits, const acc_t* bias, int64_t T, int64_t E, int64_t k,
                 bool softmax, bool renormalize, acc_t* weights, int64_t* indices, acc_t* scores) {
  at::parallel_for(0, T, rows_grain(E * 16, 16 * 1024), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top_value(k);
    std::vector<int64_t> top_index(k);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* in = logits + t * E;
      acc_t* s = scores + t * E;
      if (softmax) {
        acc_t max_value = -std::numeric_limits<acc_t>::infinity();
        for (int64_t e = 0; e < E; ++e) {
          s[e] = static_cast<acc_t>(in[e]);
          max_value = std::max(max_value, s[e]);
        }
        acc_t sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          s[e] = std::exp(s[e] - max_value);
          sum += s[e];
        }
        const acc_t inv = acc_t(1) / sum;
        for (int64_t e = 0; e < E; ++e) s[e] *= inv;
      } else {
        for (int64_t e = 0; e < E; ++e) s[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(in[e])));
      }
      // Insertion into a sorted list of k: a strict '>' keeps the lower index first among ties.
      int64_t filled = 0;
      for (int64_t e = 0; e < E; ++e) {
        const acc_t v = bias ? s[e] + bias[e] : s[e];
        if (filled < k || v > top_value[k - 1]) {
          int64_t j = filled < k ? filled++ : k - 1;
          while (j > 0 && v > top_value[j - 1]) {
            top_value[j] = top_value[j - 1];
            top_index[j] = top_index[j - 1];
            --j;
          }
          top_value[j] = v;
          top_index[j] = e;
        }
      }
      acc_t* w = weights + t * k;
      int64_t* idx = indices + t * k;
      acc_t total = 0;
      for (int64_t j = 0; j < k; ++j) {
        idx[j] = top_index[j];
        w[j] = s[top_index[j]];
        total += w[j];
      }
      if (renormalize) {
        // Divide (not multiply by 1/total), as the reference does: a lone top-1 weight is
        // exactly 1, and the router's weights match PyTorch's to the last bit for k <= 2.
        const acc_t denom = std::max(total, static_cast<acc_t>(kRenormEps));
        for (int64_t j = 0; j < k; ++j) w[j] /= denom;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits_TE, int64_t k, c10::string_view score_func, bool renormalize,
    const std::optional<at::Tensor>& bias_E) {
  TORCH_CHECK_VALUE(logits_TE.dim() == 2, "logits_TE must be 2-D (tokens, experts), got ",
                    logits_TE.sizes());
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "k must be in [1, E = ", E, "], got ", k);
  const bool softmax = score_func == "softmax";
  TORCH_CHECK_VALUE(softmax || score_func == "sigmoid",
                    "score_func must be 'softmax' or 'sigmoid', got '", std::string(score_func), "'");
  const auto math = math_dtype(logits_TE.scalar_type());
  const auto options = logits_TE.options().dtype(math);
  auto logits = logits_TE.contiguous();
  auto weights_TK = at::empty({T, k}, options);
  auto indices_TK = at::empty({T, k}, logits_TE.options().dtype(at::kLong));
  auto scores_TE = at::empty({T, E}, options);
  at::Tensor bias;
  if (bias_E.has_value() && bias_E->defined()) {
    TORCH_CHECK_VALUE(bias_E->dim() == 1 && bias_E->size(0) == E, "bias_E must have shape (", E,
                      "), got ", bias_E->sizes());
    bias = bias_E->to(math).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gating_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(),
                                 bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr, T, E, k,
                                 softmax, renormalize, weights_TK.mutable_data_ptr<acc_t>(),
                                 indices_TK.mutable_data_ptr<int64_t>(),
                                 scores_TE.mutable_data_ptr<acc_t>());
  });
  return {weights_TK, indices_TK, scores_TE};
}

}  // namespace hecate::cpu
