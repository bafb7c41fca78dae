// C interface of the CUDA kernels of hecate._C.
//
// Why a C interface: the .cu files include only CUDA headers (no torch), so
// `nvcc -c` compiles them on a machine with a CUDA toolkit but a CPU-only torch
// (see tools/cuda_check.sh and docs/build.md). csrc/cuda/cuda_ops.cpp is the
// torch side: it checks inputs, allocates outputs and workspaces, and calls
// these launchers on the current stream.
//
// Conventions: every pointer is a device pointer to contiguous row-major data;
// every launcher only enqueues work on `stream` and returns the launch status
// (cudaSuccess or the first error). Sizes are element counts unless they say
// bytes. Semantics are those of docs/ops.md.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of a data tensor. The float kernels take F32 / F16 / BF16 / F64; only
// scatter_add_chunks also takes the integer types (copies are dtype-agnostic byte copies).
// "Math type" below means fp64 for F64 data and fp32 for the other float types.
typedef enum {
  HECATE_F32 = 0,
  HECATE_F16 = 1,
  HECATE_BF16 = 2,
  HECATE_F64 = 3,
  HECATE_U8 = 4,
  HECATE_I8 = 5,
  HECATE_I16 = 6,
  HECATE_I32 = 7,
  HECATE_I64 = 8,
} hecate_dtype;

typedef enum {
  HECATE_SCORE_SOFTMAX = 0,
  HECATE_SCORE_SIGMOID = 1,
} hecate_score_func;

// topk_gating: logits_TE (dtype) -> weights_TK, indices_TK i64, scores_TE. bias_E, weights_TK
// and scores_TE are in the math type; bias_E may be NULL. Requires 1 <= K <= E.
// Renormalization divides by max(sum, 1e-20), like the CPU kernel and the reference. Every index
// is in [0, E): a NaN selection value ranks as -inf (its weight is the NaN score).
cudaError_t hecate_topk_gating(const void* logits_TE, hecate_dtype dtype, const void* bias_E,
                               int64_t T, int64_t E, int64_t K, hecate_score_func score_func,
                               int renormalize, void* weights_TK, int64_t* indices_TK,
                               void* scores_TE, cudaStream_t stream);

// expert_histogram: counts_B[b] = #{i : indices_n[i] == b}; entries outside [0, B) are ignored.
cudaError_t hecate_expert_histogram(const int64_t* indices_n, int64_t n, int64_t B,
                                    int64_t* counts_B, cudaStream_t stream);

// permute, step 1 (routing only, no data): fills row_map_TK and counts_B (kept rows per bin).
// capacity < 0 is dropless; priority_TK (f64) selects by priority, NULL by GShard position.
// Bins outside [0, B) are treated as unrouted (the torch wrapper rejects bins >= B).
// The workspace must hold hecate_permute_workspace_bytes(...) bytes. Requires T*K < 2^31.
size_t hecate_permute_workspace_bytes(int64_t T, int64_t K, int64_t B, int64_t capacity,
                                      int has_priority);
cudaError_t hecate_permute_plan(const int64_t* bins_TK, int64_t T, int64_t K, int64_t B,
                                int64_t capacity, const double* priority_TK, int64_t* row_map_TK,
                                int64_t* counts_B, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// permute, step 2: x_ND[row_map[t, k]] = x_TD[t] for every kept entry. Rows are copied as
// bytes (row_bytes = D * element size), so any dtype works.
cudaError_t hecate_gather_rows(const void* x_TD, const int64_t* row_map_TK, int64_t T, int64_t K,
                               int64_t row_bytes, void* x_ND, cudaStream_t stream);

// unpermute: out_TD[t] = sum_k weights[t, k] * y_ND[row_map[t, k]] over kept k, accumulated in
// the math type. weights_TK is in the math type, or NULL (= 1). Rows outside [0, N) count as
// dropped (the Python face rejects them before the call).
cudaError_t hecate_unpermute(const void* y_ND, hecate_dtype dtype, int64_t N,
                             const int64_t* row_map_TK, const void* weights_TK, int64_t T,
                             int64_t K, int64_t D, void* out_TD, cudaStream_t stream);

// unpermute_backward: grad_y_ND[row_map[t, k]] = weights[t, k] * grad_TD[t] (the caller zeroes
// grad_y_ND first: rows no entry maps to stay 0); grad_weights_TK[t, k] = <grad[t], y[row]>
// (0 when dropped). weights_TK and grad_weights_TK are in the math type; weights_TK NULL
// means 1; grad_weights_TK NULL means not wanted. row_map must not map two entries to one
// row (permute never does; the rows are written in parallel): the torch op checks it on the
// device first (a histogram of the rows and a queued assert).
cudaError_t hecate_unpermute_backward(const void* grad_TD, const void* y_ND, hecate_dtype dtype,
                                      int64_t N, const int64_t* row_map_TK,
                                      const void* weights_TK, int64_t T, int64_t K, int64_t D,
                                      void* grad_y_ND, void* grad_weights_TK, cudaStream_t stream);

// The three chunk launchers never copy a row whose id is outside [0, C): the kernel fails a
// device-side assert instead (the stream's next synchronization raises a CUDA error). With
// n == 0 or empty rows (row_bytes or S == 0) nothing is launched and nothing is checked.

// pack_chunks: out_nS[i] = buffer_CS[chunk_ids[i]] (byte copy of row_bytes per chunk).
cudaError_t hecate_pack_chunks(const void* buffer_CS, int64_t C, int64_t row_bytes,
                               const int64_t* chunk_ids_n, int64_t n, void* out_nS,
                               cudaStream_t stream);

// unpack_chunks: out_CS[chunk_ids[i]] = recv_nS[i], in place; for a repeated id the last
// i wins (each thread walks i in order, so the result is deterministic).
cudaError_t hecate_unpack_chunks(const void* recv_nS, const int64_t* chunk_ids_n, int64_t n,
                                 int64_t row_bytes, void* out_CS, int64_t C, cudaStream_t stream);

// scatter_add_chunks: out_CS[chunk_ids[i]] += recv_nS[i], in place, in order of i (each
// thread owns a column and walks i in order: deterministic, no atomics).
cudaError_t hecate_scatter_add_chunks(const void* recv_nS, hecate_dtype dtype,
                                      const int64_t* chunk_ids_n, int64_t n, int64_t S,
                                      void* out_CS, int64_t C, cudaStream_t stream);

// ---- attention (csrc/cuda/attention.cu; contract in docs/ops.md "Attention") ----
// q [B, H, Sq, d], k / v [B, G, Sk, d] (G divides H), contiguous, in `dtype`; d <= 256.
// Masks: causal (query row s sits at position s + Sk - Sq), window (0 = none), sinks, and an
// optional block list (block_offsets [H, ceil(Sq / block_size) + 1], block_cols ascending key
// blocks; both NULL for none). `scale` > 0 multiplies the scores. lse, row_weight, dout,
// delta and the gradient buffers are in the math type.
// Forward: out [B, H, Sq, d] (dtype); row_active (uint8 [B, H, Sq], NULL = all rows) skips
// unselected MoH pairs (out stays as the caller filled it, lse -inf); row_weight ([B, H, Sq],
// NULL = 1) multiplies out; out_raw (NULL = not wanted) receives the unweighted output.
cudaError_t hecate_attention_fwd(const void* q, const void* k, const void* v, hecate_dtype dtype,
                                 int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk, int64_t d,
                                 double scale, int causal, int64_t window, int64_t sinks,
                                 const int64_t* block_offsets, const int64_t* block_cols,
                                 int64_t block_size, const uint8_t* row_active, const void* row_weight,
                                 void* out, void* out_raw, void* lse, cudaStream_t stream);
// Shared memory (bytes, dynamic plus static) one block of the forward (backward = 0) or the
// backward (backward = 1) needs for head_dim d in `dtype`: it grows with d and the math type,
// and the caller compares it with the device's per-block opt-in limit before launching (fp64
// backward with d > 211 exceeds sm_80's 163 KiB).
size_t hecate_attention_smem_bytes(hecate_dtype dtype, int64_t d, int backward);
// Backward: dout [B, H, Sq, d] (already multiplied by MoH weights), lse and delta
// (= rowsum(dout * out)) [B, H, Sq]; accumulates (atomicAdd) into zeroed dq [B, H, Sq, d] and
// dk / dv [B, G, Sk, d]. Rows with lse = -inf contribute nothing.
cudaError_t hecate_attention_bwd(const void* q, const void* k, const void* v, hecate_dtype dtype,
                                 int64_t B, int64_t H, int64_t G, int64_t Sq, int64_t Sk, int64_t d,
                                 double scale, int causal, int64_t window, int64_t sinks,
                                 const int64_t* block_offsets, const int64_t* block_cols,
                                 int64_t block_size, const void* dout, const void* lse,
                                 const void* delta, void* dq, void* dk, void* dv, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
