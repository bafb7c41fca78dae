// CUDA implementations of the torch.ops.hecate operators: the torch side of csrc/cuda/.
// Each function checks its inputs the way the CPU kernel does (csrc/cpu/), allocates outputs
// and workspaces with the caching allocator, and calls the C launchers of kernels.h on the
// current stream of the input's device. Data-dependent range checks that would need a
// device-to-host sync (rows out of range) are left to the Python face (hecate.ops); the
// kernels skip such entries instead of touching memory out of bounds. The chunk ops check
// their ids on the device (see "Chunk ids" below), as unpermute_backward its rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "kernels.h"

namespace hecate::cuda {
namespace {

using at::Tensor;

hecate_dtype dtype_code(const Tensor& t, const char* name, bool allow_integers = false) {
  switch (t.scalar_type()) {
    case at::kFloat: return HECATE_F32;
    case at::kHalf: return HECATE_F16;
    case at::kBFloat16: return HECATE_BF16;
    case at::kDouble: return HECATE_F64;
    default: break;
  }
  if (allow_integers) {
    switch (t.scalar_type()) {
      case at::kByte: return HECATE_U8;
      case at::kChar: return HECATE_I8;
      case at::kShort: return HECATE_I16;
      case at::kInt: return HECATE_I32;
      case at::kLong: return HECATE_I64;
      default: break;
    }
  }
  TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                   "; the CUDA kernel takes float32, float16, bfloat16 or float64",
                   allow_integers ? " (or an integer type)" : "");
}

// fp32 math for every float dtype, fp64 for fp64 (as the CPU kernels).
at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dispatcher picks this kernel when any argument is on CUDA; the main one must be.
void require_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " is on ", t.device(),
                    " but another argument is on CUDA; move them to one device");
}

void check_device(const Tensor& t, const char* name, const Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
                    " is on ", like.device(), "; move them to one device");
}

// Chunk ids may come from the host: copy them to the data's device.
Tensor ids_on(const Tensor& chunk_ids_n, const Tensor& data) {
  TORCH_CHECK_VALUE(chunk_ids_n.dim() == 1 && chunk_ids_n.scalar_type() == at::kLong,
                    "chunk_ids_n must be a 1-D int64 tensor, got ", chunk_ids_n.sizes(), " ",
                    chunk_ids_n.scalar_type());
  return chunk_ids_n.to(data.device()).contiguous();
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// HECATE_SYNC_CHECKS=1 (as in hecate/ops/_validate.py): data checks read values back and raise.
bool sync_checks() {
  const char* value = std::getenv("HECATE_SYNC_CHECKS");
  return value != nullptr && std::string(value) != "" && std::string(value) != "0";
}

// Optional weights as a contiguous math-type tensor (or undefined).
Tensor weights_as(const std::optional<Tensor>& weights_TK, const Tensor& row_map_TK, at::ScalarType math) {
  if (!weights_TK.has_value() || !weights_TK->defined()) return {};
  TORCH_CHECK_VALUE(weights_TK->sizes() == row_map_TK.sizes(), "weights_TK must have shape ",
                    row_map_TK.sizes(), ", got ", weights_TK->sizes());
  check_device(*weights_TK, "weights_TK", row_map_TK, "row_map_TK");
  return weights_TK->to(math).contiguous();
}

void check_row_map(const Tensor& row_map_TK, const Tensor& y_ND) {
  TORCH_CHECK_VALUE(row_map_TK.dim() == 2 && row_map_TK.scalar_type() == at::kLong,
                    "row_map_TK must be a 2-D int64 tensor, got ", row_map_TK.sizes(), " ",
                    row_map_TK.scalar_type());
  check_device(row_map_TK, "row_map_TK", y_ND, "y_ND");
}

std::tuple<Tensor, Tensor, Tensor> topk_gating(const Tensor& logits_TE, int64_t k,
                                               c10::string_view score_func, bool renormalize,
                                               const std::optional<Tensor>& bias_E) {
  require_cuda(logits_TE, "logits_TE");
  TORCH_CHECK_VALUE(logits_TE.dim() == 2, "logits_TE must be 2-D (tokens, experts), got ",
                    logits_TE.sizes());
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "k must be in [1, E = ", E, "], got ", k);
  TORCH_CHECK_VALUE(E <= INT_MAX, "logits_TE has ", E, " experts; the CUDA kernel takes at most ", INT_MAX);
  const bool softmax = score_func == "softmax";
  TORCH_CHECK_VALUE(softmax || score_func == "sigmoid",
                    "score_func must be 'softmax' or 'sigmoid', got '", std::string(score_func), "'");
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  auto logits = logits_TE.contiguous();
  const hecate_dtype dtype = dtype_code(logits, "logits_TE");
  const auto options = logits.options().dtype(math_dtype(logits.scalar_type()));
  auto weights_TK = at::empty({T, k}, options);
  auto indices_TK = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto scores_TE = at::empty({T, E}, options);
  Tensor bias;
  if (bias_E.has_value() && bias_E->defined()) {
    TORCH_CHECK_VALUE(bias_E->dim() == 1 && bias_E->size(0) == E, "bias_E must have shape (", E,
                      "), got ", bias_E->sizes());
    check_device(*bias_E, "bias_E", logits_TE, "logits_TE");
    bias = bias_E->to(options.dtype()).contiguous();
  }
  C10_CUDA_CHECK(hecate_topk_gating(logits.const_data_ptr(), dtype,
                                    bias.defined() ? bias.const_data_ptr() : nullptr, T, E, k,
                                    softmax ? HECATE_SCORE_SOFTMAX : HECATE_SCORE_SIGMOID,
                                    renormalize, weights_TK.mutable_data_ptr(),
                                    indices_TK.mutable_data_ptr<int64_t>(),
                                    scores_TE.mutable_data_ptr(), current_stream()));
  return {weights_TK, indices_TK, scores_TE};
}

Tensor expert_histogram(const Tensor& indices_TK, int64_t num_bins) {
  require_cuda(indices_TK, "indices_TK");
  TORCH_CHECK_VALUE(indices_TK.scalar_type() == at::kLong, "indices_TK must be int64, got ",
                    indices_TK.scalar_type());
  TORCH_CHECK_VALUE(num_bins >= 1, "num_bins must be >= 1, got ", num_bins);
  const c10::cuda::CUDAGuard guard(indices_TK.device());
  auto indices = indices_TK.contiguous();
  auto counts_B = at::empty({num_bins}, indices.options());
  C10_CUDA_CHECK(hecate_expert_histogram(indices.const_data_ptr<int64_t>(), indices.numel(), num_bins,
                                         counts_B.mutable_data_ptr<int64_t>(), current_stream()));
  return counts_B;
}

std::tuple<Tensor, Tensor, Tensor> permute(const Tensor& x_TD, const Tensor& bins_TK, int64_t num_bins,
                                           int64_t capacity, const std::optional<Tensor>& priority_TK) {
  require_cuda(x_TD, "x_TD");
  TORCH_CHECK_VALUE(x_TD.dim() == 2, "x_TD must be 2-D, got ", x_TD.sizes());
  TORCH_CHECK_VALUE(bins_TK.dim() == 2 && bins_TK.size(0) == x_TD.size(0),
                    "bins_TK must have shape (", x_TD.size(0), ", K), got ", bins_TK.sizes());
  TORCH_CHECK_VALUE(bins_TK.scalar_type() == at::kLong, "bins_TK must be int64");
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins < INT_MAX, "num_bins must be in [1, ", INT_MAX, "), got ",
                    num_bins);
  check_device(bins_TK, "bins_TK", x_TD, "x_TD");
  const int64_t T = bins_TK.size(0), K = bins_TK.size(1), D = x_TD.size(1), n = T * K;
  TORCH_CHECK_VALUE(n < INT_MAX, "bins_TK has ", n, " entries; the CUDA permute takes fewer than ", INT_MAX);
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const cudaStream_t stream = current_stream();
  auto x = x_TD.contiguous();
  auto bins = bins_TK.contiguous();
  Tensor priority;
  if (capacity >= 0 && priority_TK.has_value() && priority_TK->defined()) {
    TORCH_CHECK_VALUE(priority_TK->sizes() == bins_TK.sizes(), "priority_TK must have shape ",
                      bins_TK.sizes(), ", got ", priority_TK->sizes());
    check_device(*priority_TK, "priority_TK", x_TD, "x_TD");
    priority = priority_TK->to(at::kDouble).contiguous();  // the CPU kernel ranks in fp64 too
  }
  auto row_map_TK = at::empty({T, K}, bins.options());
  auto counts_B = at::empty({num_bins}, bins.options());
  const size_t ws_bytes = hecate_permute_workspace_bytes(T, K, num_bins, capacity, priority.defined());
  auto workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(hecate_permute_plan(bins.const_data_ptr<int64_t>(), T, K, num_bins, capacity,
                                     priority.defined() ? priority.const_data_ptr<double>() : nullptr,
                                     row_map_TK.mutable_data_ptr<int64_t>(),
                                     counts_B.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr(),
                                     ws_bytes, stream));
  // The one host sync of permute: x_ND's row count, with the largest bin for the range check.
  auto largest = n > 0 ? bins.max() : at::full({}, -1, bins.options());
  auto stats = at::stack({counts_B.sum(), largest}).cpu();
  const int64_t N = stats[0].item<int64_t>(), max_bin = stats[1].item<int64_t>();
  TORCH_CHECK_VALUE(max_bin < num_bins, "bins_TK contains ", max_bin, ", out of range for num_bins = ",
                    num_bins);
  auto x_ND = at::empty({N, D}, x.options());
  if (N > 0)
    C10_CUDA_CHECK(hecate_gather_rows(x.const_data_ptr(), row_map_TK.const_data_ptr<int64_t>(), T, K,
                                      D * x.element_size(), x_ND.mutable_data_ptr(), stream));
  return {x_ND, row_map_TK, counts_B};
}

Tensor unpermute(const Tensor& y_ND, const Tensor& row_map_TK, const std::optional<Tensor>& weights_TK) {
  require_cuda(y_ND, "y_ND");
  TORCH_CHECK_VALUE(y_ND.dim() == 2, "y_ND must be 2-D, got ", y_ND.sizes());
  check_row_map(row_map_TK, y_ND);
  const c10::cuda::CUDAGuard guard(y_ND.device());
  auto y = y_ND.contiguous();
  auto row_map = row_map_TK.contiguous();
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y.size(0), D = y.size(1);
  const hecate_dtype dtype = dtype_code(y, "y_ND");
  auto weights = weights_as(weights_TK, row_map, math_dtype(y.scalar_type()));
  auto out_TD = at::empty({T, D}, y.options());
  C10_CUDA_CHECK(hecate_unpermute(y.const_data_ptr(), dtype, N, row_map.const_data_ptr<int64_t>(),
                                  weights.defined() ? weights.const_data_ptr() : nullptr, T, K, D,
                                  out_TD.mutable_data_ptr(), current_stream()));
  return out_TD;
}

std::tuple<Tensor, Tensor> unpermute_backward(const Tensor& grad_TD, const Tensor& y_ND,
                                              const Tensor& row_map_TK,
                                              const std::optional<Tensor>& weights_TK,
                                              bool need_grad_weights) {
  require_cuda(y_ND, "y_ND");
  TORCH_CHECK_VALUE(y_ND.dim() == 2, "y_ND must be 2-D, got ", y_ND.sizes());
  check_row_map(row_map_TK, y_ND);
  const int64_t T = row_map_TK.size(0), K = row_map_TK.size(1), N = y_ND.size(0), D = y_ND.size(1);
  TORCH_CHECK_VALUE(grad_TD.dim() == 2 && grad_TD.size(0) == T && grad_TD.size(1) == D,
                    "grad_TD must have shape (", T, ", ", D, "), got ", grad_TD.sizes());
  check_device(grad_TD, "grad_TD", y_ND, "y_ND");
  const c10::cuda::CUDAGuard guard(y_ND.device());
  auto y = y_ND.contiguous();
  auto row_map = row_map_TK.contiguous();
  auto grad = grad_TD.to(y.scalar_type()).contiguous();
  const hecate_dtype dtype = dtype_code(y, "y_ND");
  const auto math = math_dtype(y.scalar_type());
  auto weights = weights_as(weights_TK, row_map, math);
  // Each row of y may be referenced once, as the CPU op checks: the kernel writes rows in
  // parallel, so a row named twice would keep one entry's gradient (a race, silently wrong).
  // Checked on the device with a queued assert (no host read: a repeat stops the program at the
  // next synchronization), or read back and raised at once under HECATE_SYNC_CHECKS=1.
  if (N > 0 && row_map.numel() > 0) {
    auto refs_N = at::empty({N}, row_map.options());
    C10_CUDA_CHECK(hecate_expert_histogram(row_map.const_data_ptr<int64_t>(), row_map.numel(), N,
                                           refs_N.mutable_data_ptr<int64_t>(), current_stream()));
    auto once = refs_N.max() <= 1;
    constexpr const char* kTwice = "row_map_TK references a row of y_ND more than once; "
                                   "unpermute_backward needs a permutation (as permute makes)";
    if (sync_checks()) {
      TORCH_CHECK_VALUE(once.item<bool>(), kTwice);
    } else {
      at::_assert_async(once, kTwice);
    }
  }
  auto grad_y_ND = at::zeros({N, D}, y.options());  // rows no entry maps to get zero gradient
  Tensor grad_weights;
  const bool want_weights = need_grad_weights && weights.defined();
  if (want_weights) grad_weights = at::empty({T, K}, y.options().dtype(math));
  C10_CUDA_CHECK(hecate_unpermute_backward(
      grad.const_data_ptr(), y.const_data_ptr(), dtype, N, row_map.const_data_ptr<int64_t>(),
      weights.defined() ? weights.const_data_ptr() : nullptr, T, K, D, grad_y_ND.mutable_data_ptr(),
      want_weights ? grad_weights.mutable_data_ptr() : nullptr, current_stream()));
  if (want_weights) grad_weights = grad_weights.to(weights_TK->scalar_type());
  return {grad_y_ND, grad_weights};
}

void check_recv(const Tensor& recv_nS, const Tensor& chunk_ids_n, const Tensor& out_CS) {
  require_cuda(out_CS, "out_CS");
  TORCH_CHECK_VALUE(out_CS.dim() == 2 && out_CS.is_contiguous(), "out_CS must be a contiguous 2-D tensor");
  TORCH_CHECK_VALUE(recv_nS.dim() == 2 && recv_nS.size(0) == chunk_ids_n.numel() &&
                        recv_nS.size(1) == out_CS.size(1),
                    "recv_nS must have shape (", chunk_ids_n.numel(), ", ", out_CS.size(1), "), got ",
                    recv_nS.sizes());
  TORCH_CHECK_VALUE(recv_nS.scalar_type() == out_CS.scalar_type(), "recv_nS dtype ", recv_nS.scalar_type(),
                    " differs from out_CS dtype ", out_CS.scalar_type());
  check_device(recv_nS, "recv_nS", out_CS, "out_CS");
}

// Chunk ids outside [0, C): the CPU op raises ValueError; so do these, without slowing valid
// calls. By default the kernels check them (chunks.cu): a bad id is never copied and fails a
// device-side assert (no extra launch, no host read; the error stops the program at the next
// synchronization and, like any device assert, leaves the CUDA context unusable). Under
// HECATE_SYNC_CHECKS=1 the ids are read back here before the launch, raising the CPU op's
// ValueError at once with nothing written. Empty rows (S == 0) launch no kernel: their ids are
// checked by a queued _assert_async instead.
void check_chunk_ids(const Tensor& ids, int64_t C, int64_t S) {
  const bool sync = sync_checks();
  if (ids.numel() == 0 || (!sync && S > 0)) return;  // the hot path: the kernel checks
  auto bad = (ids < 0) | (ids >= C);
  if (sync) {
    auto first = bad.nonzero();
    if (first.size(0) == 0) return;
    const int64_t i = first[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "chunk_ids_n[", i, "] = ", ids[i].item<int64_t>(), " is out of range for ",
                      C, " chunks");
  }
  if (S == 0) at::_assert_async(bad.any().logical_not(), "chunk_ids_n has an entry outside [0, chunks)");
}

Tensor pack_chunks(const Tensor& buffer_CS, const Tensor& chunk_ids_n) {
  require_cuda(buffer_CS, "buffer_CS");
  TORCH_CHECK_VALUE(buffer_CS.dim() == 2, "buffer_CS must be 2-D, got ", buffer_CS.sizes());
  const c10::cuda::CUDAGuard guard(buffer_CS.device());
  auto buffer = buffer_CS.contiguous();
  auto ids = ids_on(chunk_ids_n, buffer);
  const int64_t n = ids.numel(), C = buffer.size(0), S = buffer.size(1);
  check_chunk_ids(ids, C, S);
  auto out_nS = at::empty({n, S}, buffer.options());
  C10_CUDA_CHECK(hecate_pack_chunks(buffer.const_data_ptr(), C, S * buffer.element_size(),
                                    ids.const_data_ptr<int64_t>(), n, out_nS.mutable_data_ptr(),
                                    current_stream()));
  return out_nS;
}

void unpack_chunks(const Tensor& recv_nS, const Tensor& chunk_ids_n, const Tensor& out_CS) {
  check_recv(recv_nS, chunk_ids_n, out_CS);
  const c10::cuda::CUDAGuard guard(out_CS.device());
  auto ids = ids_on(chunk_ids_n, out_CS);
  auto recv = recv_nS.contiguous();
  check_chunk_ids(ids, out_CS.size(0), out_CS.size(1));
  C10_CUDA_CHECK(hecate_unpack_chunks(recv.const_data_ptr(), ids.const_data_ptr<int64_t>(), ids.numel(),
                                      out_CS.size(1) * out_CS.element_size(), out_CS.mutable_data_ptr(),
                                      out_CS.size(0), current_stream()));
}

void scatter_add_chunks(const Tensor& recv_nS, const Tensor& chunk_ids_n, const Tensor& out_CS) {
  check_recv(recv_nS, chunk_ids_n, out_CS);
  const c10::cuda::CUDAGuard guard(out_CS.device());
  const hecate_dtype dtype = dtype_code(out_CS, "out_CS", /*allow_integers=*/true);
  auto ids = ids_on(chunk_ids_n, out_CS);
  auto recv = recv_nS.contiguous();
  check_chunk_ids(ids, out_CS.size(0), out_CS.size(1));
  C10_CUDA_CHECK(hecate_scatter_add_chunks(recv.const_data_ptr(), dtype, ids.const_data_ptr<int64_t>(),
                                           ids.numel(), out_CS.size(1), out_CS.mutable_data_ptr(),
                                           out_CS.size(0), current_stream()));
}

}  // namespace
}  // namespace hecate::cuda

// ---------------------------------------------------------------- attention (attention.cu)
namespace hecate::cuda {
namespace {

struct AttnInputs {
  Tensor q, k, v, offsets, cols;
  int64_t B, H, G, Sq, Sk, d, block_size;
  double scale;
};

AttnInputs attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t window,
                            int64_t sinks, const std::optional<Tensor>& block_offsets,
                            const std::optional<Tensor>& block_cols, int64_t block_size) {
  require_cuda(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
                    "q must be [B, H, Sq, d] and k, v one [B, G, Sk, d] shape, got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                    "q, k and v must have one dtype");
  check_device(k, "k", q, "q");
  check_device(v, "v", q, "q");
  AttnInputs in;
  in.B = q.size(0); in.H = q.size(1); in.Sq = q.size(2); in.d = q.size(3);
  in.G = k.size(1); in.Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == in.B && k.size(3) == in.d, "k must have q's batch and head_dim");
  TORCH_CHECK_VALUE(in.H >= 1, "q has no query heads; attention needs at least one");
  TORCH_CHECK_VALUE(in.G >= 1 && in.H % in.G == 0, "the kv heads (", in.G, ") must divide the query heads (",
                    in.H, ")");
  TORCH_CHECK_VALUE(in.d >= 1 && in.d <= 256, "head_dim must be in [1, 256], got ", in.d);
  TORCH_CHECK_VALUE(window >= 0 && sinks >= 0, "window and sinks must be >= 0");
  TORCH_CHECK_VALUE(in.B <= 65535 && in.H <= 65535, "the CUDA attention takes at most 65535 batches and heads");
  in.q = q.contiguous(); in.k = k.contiguous(); in.v = v.contiguous();
  in.scale = scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(in.d));
  in.block_size = 0;
  const bool has_offsets = block_offsets.has_value() && block_offsets->defined();
  TORCH_CHECK_VALUE(has_offsets == (block_cols.has_value() && block_cols->defined()),
                    "block_offsets and block_cols go together");
  if (has_offsets) {
    TORCH_CHECK_VALUE(block_size >= 1, "a block list needs block_size >= 1, got ", block_size);
    const int64_t nqb = (in.Sq + block_size - 1) / block_size;
    in.offsets = block_offsets->to(q.device(), at::kLong).contiguous();
    in.cols = block_cols->to(q.device(), at::kLong).contiguous();
    TORCH_CHECK_VALUE(in.offsets.dim() == 2 && in.offsets.size(0) == in.H && in.offsets.size(1) == nqb + 1,
                      "block_offsets must have shape [", in.H, ", ", nqb + 1, "], got ", in.offsets.sizes());
    in.block_size = block_size;
  }
  return in;
}

// The backward's saved tensors: the kernel reads lse [B, H, Sq] and the others by q's shape,
// on q's device (a host pointer or a short lse would be read out of bounds on the device).
void check_saved(const AttnInputs& in, const Tensor& q, const Tensor& grad_out, const Tensor& out,
                 const char* out_name, const Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and ", out_name,
                    " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({in.B, in.H, in.Sq}), "lse must have shape [B, H, Sq] = [",
                    in.B, ", ", in.H, ", ", in.Sq, "], got ", lse.sizes());
  check_device(grad_out, "grad_out", q, "q");
  check_device(out, out_name, q, "q");
  check_device(lse, "lse", q, "q");
}

const int64_t* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

// The kernels keep tiles of 16 x d in shared memory in the math type: refuse a head_dim / dtype
// this GPU cannot hold with a message saying so (the launch would fail with "invalid argument").
void check_attention_smem(const AttnInputs& in, bool backward) {
  const size_t need = hecate_attention_smem_bytes(dtype_code(in.q, "q"), in.d, backward);
  int optin = 0;  // an attribute query: no synchronization
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, in.q.get_device()));
  const size_t have = static_cast<size_t>(optin);
  TORCH_CHECK_VALUE(need <= have, "the CUDA attention ", backward ? "backward" : "forward", " with head_dim ",
                    in.d, " in ", in.q.scalar_type(), " needs ", need,
                    " bytes of shared memory per block, more than this GPU's ", have,
                    "; use float32 / bfloat16 (fp32 math) or a smaller head_dim");
}

std::tuple<Tensor, Tensor> flash_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                               bool causal, int64_t window, int64_t sinks,
                                               const std::optional<Tensor>& block_offsets,
                                               const std::optional<Tensor>& block_cols, int64_t block_size) {
  AttnInputs in = attention_inputs(q, k, v, scale, window, sinks, block_offsets, block_cols, block_size);
  const c10::cuda::CUDAGuard guard(q.device());
  check_attention_smem(in, /*backward=*/false);
  auto out = at::zeros({in.B, in.H, in.Sq, in.d}, in.q.options());
  auto lse = at::empty({in.B, in.H, in.Sq}, in.q.options().dtype(math_dtype(q.scalar_type())));
  C10_CUDA_CHECK(hecate_attention_fwd(in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                                      dtype_code(in.q, "q"), in.B, in.H, in.G, in.Sq, in.Sk, in.d, in.scale,
                                      causal, window, sinks, ptr_or_null(in.offsets), ptr_or_null(in.cols),
                                      in.block_size, nullptr, nullptr, out.mutable_data_ptr(), nullptr,
                                      lse.mutable_data_ptr(), current_stream()));
  return {out, lse};
}

// dq, dk, dv from dout (math type, MoH weights folded in) and delta = rowsum(dout * out).
std::tuple<Tensor, Tensor, Tensor> attention_grads(const AttnInputs& in, const Tensor& dout, const Tensor& lse,
                                                   const Tensor& delta, bool causal, int64_t window,
                                                   int64_t sinks) {
  check_attention_smem(in, /*backward=*/true);
  const auto math = math_dtype(in.q.scalar_type());
  auto dq = at::zeros({in.B, in.H, in.Sq, in.d}, in.q.options().dtype(math));
  auto dk = at::zeros({in.B, in.G, in.Sk, in.d}, in.q.options().dtype(math));
  auto dv = at::zeros_like(dk);
  auto lse_c = lse.to(math).contiguous();
  C10_CUDA_CHECK(hecate_attention_bwd(in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                                      dtype_code(in.q, "q"), in.B, in.H, in.G, in.Sq, in.Sk, in.d, in.scale,
                                      causal, window, sinks, ptr_or_null(in.offsets), ptr_or_null(in.cols),
                                      in.block_size, dout.const_data_ptr(), lse_c.const_data_ptr(),
                                      delta.const_data_ptr(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
                                      dv.mutable_data_ptr(), current_stream()));
  const auto dtype = in.q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

std::tuple<Tensor, Tensor, Tensor> flash_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, double scale, bool causal, int64_t window, int64_t sinks,
    const std::optional<Tensor>& block_offsets, const std::optional<Tensor>& block_cols, int64_t block_size) {
  AttnInputs in = attention_inputs(q, k, v, scale, window, sinks, block_offsets, block_cols, block_size);
  check_saved(in, q, grad_out, out, "out", lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto math = math_dtype(q.scalar_type());
  auto dout = grad_out.to(math).contiguous();
  auto delta = (dout * out.to(math)).sum(-1).contiguous();
  return attention_grads(in, dout, lse, delta, causal, window, sinks);
}

// MoH routing as per-(b, h, s) maps: selected (uint8) and weight (math type), [B, H, S].
std::tuple<Tensor, Tensor, Tensor, Tensor> routing_maps(const AttnInputs& in, const Tensor& head_idx,
                                                        const Tensor& head_weight) {
  TORCH_CHECK_VALUE(in.Sq == in.Sk, "moh_attention needs q and k of one length");
  TORCH_CHECK_VALUE(head_idx.dim() == 3 && head_idx.size(0) == in.B && head_idx.size(1) == in.Sq &&
                        head_idx.scalar_type() == at::kLong,
                    "head_idx must be int64 [B, S, K], got ", head_idx.sizes());
  TORCH_CHECK_VALUE(head_weight.sizes() == head_idx.sizes(), "head_weight must have head_idx's shape");
  TORCH_CHECK_VALUE(at::isFloatingType(head_weight.scalar_type()), "head_weight must be floating point, got ",
                    head_weight.scalar_type());
  check_device(head_idx, "head_idx", in.q, "q");
  check_device(head_weight, "head_weight", in.q, "q");
  const auto math = math_dtype(in.q.scalar_type());
  auto selected = head_idx >= 0;
  auto column = at::where(selected, head_idx, in.H);  // unused slots land in a dropped column H
  auto active = at::zeros({in.B, in.Sq, in.H + 1}, head_idx.options().dtype(at::kByte))
                    .scatter_(2, column, 1)
                    .narrow(2, 0, in.H).permute({0, 2, 1}).contiguous();
  auto weight = at::zeros({in.B, in.Sq, in.H + 1}, head_idx.options().dtype(math))
                    .scatter_(2, column, head_weight.to(math))
                    .narrow(2, 0, in.H).permute({0, 2, 1}).contiguous();
  return {active, weight, selected, column};
}

std::tuple<Tensor, Tensor, Tensor> moh_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& head_idx, const Tensor& head_weight,
                                                     double scale, bool causal, int64_t window, int64_t sinks) {
  AttnInputs in = attention_inputs(q, k, v, scale, window, sinks, std::nullopt, std::nullopt, 0);
  const c10::cuda::CUDAGuard guard(q.device());
  check_attention_smem(in, /*backward=*/false);
  auto [active, weight, selected, column] = routing_maps(in, head_idx, head_weight);
  auto out = at::zeros({in.B, in.H, in.Sq, in.d}, in.q.options());
  auto out_raw = at::zeros_like(out);
  auto lse = at::empty({in.B, in.H, in.Sq}, in.q.options().dtype(math_dtype(q.scalar_type())));
  C10_CUDA_CHECK(hecate_attention_fwd(in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                                      dtype_code(in.q, "q"), in.B, in.H, in.G, in.Sq, in.Sk, in.d, in.scale,
                                      causal, window, sinks, nullptr, nullptr, 0,
                                      active.const_data_ptr<uint8_t>(), weight.const_data_ptr(),
                                      out.mutable_data_ptr(), out_raw.mutable_data_ptr(), lse.mutable_data_ptr(),
                                      current_stream()));
  return {out, out_raw, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moh_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_idx,
    const Tensor& head_weight, const Tensor& out_raw, const Tensor& lse, double scale, bool causal,
    int64_t window, int64_t sinks) {
  AttnInputs in = attention_inputs(q, k, v, scale, window, sinks, std::nullopt, std::nullopt, 0);
  check_saved(in, q, grad_out, out_raw, "out_raw", lse);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [active, weight, selected, column] = routing_maps(in, head_idx, head_weight);
  const auto math = math_dtype(q.scalar_type());
  auto go = grad_out.to(math);
  auto dots = (go * out_raw.to(math)).sum(-1);  // <dY, O> per (b, h, s): the weight gradient
  auto dout = (go * weight.unsqueeze(-1)).contiguous();
  auto delta = (dots * weight).contiguous();
  auto [dq, dk, dv] = attention_grads(in, dout, lse, delta, causal, window, sinks);
  auto dots_BSH = at::cat({dots.permute({0, 2, 1}), at::zeros({in.B, in.Sq, 1}, dots.options())}, 2);
  auto dw = at::where(selected, dots_BSH.gather(2, column), at::zeros({}, dots.options()));
  return {dq, dk, dv, dw.to(head_weight.scalar_type())};
}

}  // namespace
}  // namespace hecate::cuda

TORCH_LIBRARY_IMPL(hecate, CUDA, m) {
  m.impl("topk_gating", &hecate::cuda::topk_gating);
  m.impl("expert_histogram", &hecate::cuda::expert_histogram);
  m.impl("permute", &hecate::cuda::permute);
  m.impl("unpermute", &hecate::cuda::unpermute);
  m.impl("unpermute_backward", &hecate::cuda::unpermute_backward);
  m.impl("pack_chunks", &hecate::cuda::pack_chunks);
  m.impl("unpack_chunks", &hecate::cuda::unpack_chunks);
  m.impl("scatter_add_chunks", &hecate::cuda::scatter_add_chunks);
  m.impl("flash_attention_fwd", &hecate::cuda::flash_attention_fwd);
  m.impl("flash_attention_bwd", &hecate::cuda::flash_attention_bwd);
  m.impl("moh_attention_fwd", &hecate::cuda::moh_attention_fwd);
  m.impl("moh_attention_bwd", &hecate::cuda::moh_attention_bwd);
}
