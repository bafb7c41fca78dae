// The torch.ops.hecate operator schemas, their CPU kernels, and the hecate._C Python module.
// CUDA kernels register themselves with TORCH_LIBRARY_IMPL(hecate, CUDA, m) in csrc/cuda/.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(hecate, m) {
  m.def("topk_gating(Tensor logits, int k, str score_func, bool renormalize, Tensor? bias=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("expert_histogram(Tensor indices, int num_bins) -> Tensor");
  m.def("permute(Tensor x, Tensor bins, int num_bins, int capacity=-1, Tensor? priority=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("unpermute(Tensor y, Tensor row_map, Tensor? weights=None) -> Tensor");
  // The second result is undefined (None in Python) when weights is None or !need_grad_weights.
  m.def("unpermute_backward(Tensor grad, Tensor y, Tensor row_map, Tensor? weights=None,"
        " bool need_grad_weights=True) -> (Tensor, Tensor)");
  m.def("pack_chunks(Tensor buffer, Tensor chunk_ids) -> Tensor");
  m.def("unpack_chunks(Tensor recv, Tensor chunk_ids, Tensor(a!) out) -> ()");
  m.def("scatter_add_chunks(Tensor recv, Tensor chunk_ids, Tensor(a!) out) -> ()");
  m.def("plan_sparse_collective(Tensor owner, Tensor holders, int rank)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // Attention (csrc/cpu/attention.cpp, docs/ops.md "Attention"): out is [B, H, Sq, d], lse fp32.
  m.def("flash_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window,"
        " int sinks, Tensor? block_offsets, Tensor? block_cols, int block_size) -> (Tensor, Tensor)");
  m.def("flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " float scale, bool causal, int window, int sinks, Tensor? block_offsets, Tensor? block_cols,"
        " int block_size) -> (Tensor, Tensor, Tensor)");
  m.def("moh_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor head_idx, Tensor head_weight,"
        " float scale, bool causal, int window, int sinks) -> (Tensor, Tensor, Tensor)");
  m.def("moh_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor head_idx,"
        " Tensor head_weight, Tensor out_raw, Tensor lse, float scale, bool causal, int window,"
        " int sinks) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) {
  m.impl("topk_gating", &hecate::cpu::topk_gating);
  m.impl("expert_histogram", &hecate::cpu::expert_histogram);
  m.impl("permute", &hecate::cpu::permute);
  m.impl("unpermute", &hecate::cpu::unpermute);
  m.impl("unpermute_backward", &hecate::cpu::unpermute_backward);
  m.impl("pack_chunks", &hecate::cpu::pack_chunks);
  m.impl("unpack_chunks", &hecate::cpu::unpack_chunks);
  m.impl("scatter_add_chunks", &hecate::cpu::scatter_add_chunks);
  m.impl("plan_sparse_collective", &hecate::cpu::plan_sparse_collective);
  m.impl("flash_attention_fwd", &hecate::cpu::flash_attention_fwd);
  m.impl("flash_attention_bwd", &hecate::cpu::flash_attention_bwd);
  m.impl("moh_attention_fwd", &hecate::cpu::moh_attention_fwd);
  m.impl("moh_attention_bwd", &hecate::cpu::moh_attention_bwd);
}

PYBIND11_MODULE(_C, m) {
  // The kernels are torch ops (torch.ops.hecate.*); this module only makes the library loadable.
  m.doc() = "hecate C++/CUDA kernels (torch.ops.hecate.*)";
}
