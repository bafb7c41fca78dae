// CPU implementations of the torch.ops.hecate operators (contract: docs/ops.md).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace hecate::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits_TE, int64_t k, c10::string_view score_func, bool renormalize,
    const std::optional<at::Tensor>& bias_E);

at::Tensor expert_histogram(const at::Tensor& indices_TK, int64_t num_bins);

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(
    const at::Tensor& x_TD, const at::Tensor& bins_TK, int64_t num_bins, int64_t capacity,
    const std::optional<at::Tensor>& priority_TK);

at::Tensor unpermute(const at::Tensor& y_ND, const at::Tensor& row_map_TK,
                     const std::optional<at::Tensor>& weights_TK);

std::tuple<at::Tensor, at::Tensor> unpermute_backward(
    const at::Tensor& grad_TD, const at::Tensor& y_ND, const at::Tensor& row_map_TK,
    const std::optional<at::Tensor>& weights_TK, bool need_grad_weights);

at::Tensor pack_chunks(const at::Tensor& buffer_CS, const at::Tensor& chunk_ids_n);
void unpack_chunks(const at::Tensor& recv_nS, const at::Tensor& chunk_ids_n, const at::Tensor& out_CS);
void scatter_add_chunks(const at::Tensor& recv_nS, const at::Tensor& chunk_ids_n,
                        const at::Tensor& out_CS);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_sparse_collective(
    const at::Tensor& owner_C, const at::Tensor& holders_WC, int64_t rank);

// Attention (csrc/cpu/attention.cpp). q [B, H, Sq, d], k / v [B, G, Sk, d] with G | H; outputs
// [B, H, Sq, d] are views of [B, Sq, H, d] buffers. scale <= 0 means 1 / sqrt(d).
std::tuple<at::Tensor, at::Tensor> flash_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
    int64_t window, int64_t sinks, const std::optional<at::Tensor>& block_offsets,
    const std::optional<at::Tensor>& block_cols, int64_t block_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal, int64_t window,
    int64_t sinks, const std::optional<at::Tensor>& block_offsets,
    const std::optional<at::Tensor>& block_cols, int64_t block_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moh_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_idx,
    const at::Tensor& head_weight, double scale, bool causal, int64_t window, int64_t sinks);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& head_idx, const at::Tensor& head_weight, const at::Tensor& out_raw,
    const at::Tensor& lse, double scale, bool causal, int64_t window, int64_t sinks);

}  // namespace hecate::cpu
