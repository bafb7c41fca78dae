// pack / unpack / scatter_add of chunk rows: the buffers of the sparse collectives (spAG, spRS).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "common.h"
#include "ops.h"

namespace hecate::cpu {
namespace {

constexpr int64_t kSegmentBytes = 256 * 1024;  // unit of parallel work: a piece of one row

void check_ids(const at::Tensor& chunk_ids_n, int64_t num_chunks) {
  TORCH_CHECK_VALUE(chunk_ids_n.dim() == 1 && chunk_ids_n.scalar_type() == at::kLong,
                    "chunk_ids_n must be a 1-D int64 tensor, got ", chunk_ids_n.sizes(), " ",
                    chunk_ids_n.scalar_type());
  const int64_t* ids = chunk_ids_n.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < chunk_ids_n.numel(); ++i)
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < num_chunks, "chunk_ids_n[", i, "] = ", ids[i],
                      " is out of range for ", num_chunks, " chunks");
}

void check_recv(const at::Tensor& recv_nS, const at::Tensor& chunk_ids_n, const at::Tensor& out_CS) {
  TORCH_CHECK_VALUE(out_CS.dim() == 2 && out_CS.is_contiguous(), "out_CS must be a contiguous 2-D tensor");
  TORCH_CHECK_VALUE(recv_nS.dim() == 2 && recv_nS.size(0) == chunk_ids_n.numel() &&
                        recv_nS.size(1) == out_CS.size(1),
                    "recv_nS must have shape (", chunk_ids_n.numel(), ", ", out_CS.size(1), "), got ",
                    recv_nS.sizes());
  TORCH_CHECK_VALUE(recv_nS.scalar_type() == out_CS.scalar_type(), "recv_nS dtype ",
                    recv_nS.scalar_type(), " differs from out_CS dtype ", out_CS.scalar_type());
}

// Runs body(i, byte_begin, byte_end) over every row i < n split into segments, in parallel.
template <typename F>
void for_each_segment(int64_t n, int64_t row_bytes, const F& body) {
  const int64_t segments = std::max<int64_t>(1, (row_bytes + kSegmentBytes - 1) / kSegmentBytes);
  at::parallel_for(0, n * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / segments, s = job % segments;
      body(i, s * kSegmentBytes, std::min(row_bytes, (s + 1) * kSegmentBytes));
    }
  });
}

}  // namespace

at::Tensor pack_chunks(const at::Tensor& buffer_CS, const at::Tensor& chunk_ids_n) {
  TORCH_CHECK_VALUE(buffer_CS.dim() == 2, "buffer_CS must be 2-D, got ", buffer_CS.sizes());
  auto buffer = buffer_CS.contiguous();
  auto ids_c = chunk_ids_n.contiguous();
  check_ids(ids_c, buffer.size(0));
  const int64_t n = ids_c.numel(), row_bytes = buffer.size(1) * buffer.element_size();
  auto out_nS = at::empty({n, buffer.size(1)}, buffer.options());
  const int64_t* ids = ids_c.const_data_ptr<int64_t>();
  const char* src = static_cast<const char*>(buffer.const_data_ptr());
  char* dst = static_cast<char*>(out_nS.mutable_data_ptr());
  for_each_segment(n, row_bytes, [&](int64_t i, int64_t lo, int64_t hi) {
    std::memcpy(dst + i * row_bytes + lo, src + ids[i] * row_bytes + lo, hi - lo);
  });
  return out_nS;
}

void unpack_chunks(const at::Tensor& recv_nS, const at::Tensor& chunk_ids_n, const at::Tensor& out_CS) {
  check_recv(recv_nS, chunk_ids_n, out_CS);
  auto ids_c = chunk_ids_n.contiguous();
  check_ids(ids_c, out_CS.size(0));
  auto recv = recv_nS.contiguous();
  const int64_t row_bytes = out_CS.size(1) * out_CS.element_size();
  const int64_t* ids = ids_c.const_data_ptr<int64_t>();
  const char* src = static_cast<const char*>(recv.const_data_ptr());
  char* dst = static_cast<char*>(out_CS.mutable_data_ptr());
  // With repeated ids the last copy wins, as in the reference; rows are copied in order of i.
  bool repeated = false;
  {
    std::vector<uint8_t> seen(out_CS.size(0), 0);
    for (int64_t i = 0; i < ids_c.numel() && !repeated; ++i) repeated = seen[ids[i]]++ != 0;
  }
  if (repeated) {
    for (int64_t i = 0; i < ids_c.numel(); ++i)
      std::memcpy(dst + ids[i] * row_bytes, src + i * row_bytes, row_bytes);
    return;
  }
  for_each_segment(ids_c.numel(), row_bytes, [&](int64_t i, int64_t lo, int64_t hi) {
    std::memcpy(dst + ids[i] * row_bytes + lo, src + i * row_bytes + lo, hi - lo);
  });
}

void scatter_add_chunks(const at::Tensor& recv_nS, const at::Tensor& chunk_ids_n,
                        const at::Tensor& out_CS) {
  check_recv(recv_nS, chunk_ids_n, out_CS);
  auto ids_c = chunk_ids_n.contiguous();
  check_ids(ids_c, out_CS.size(0));
  auto recv = recv_nS.contiguous();
  const int64_t n = ids_c.numel(), S = out_CS.size(1);
  const int64_t* ids = ids_c.const_data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, out_CS.scalar_type(), "scatter_add_chunks", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = recv.const_data_ptr<scalar_t>();
    scalar_t* dst = out_CS.mutable_data_ptr<scalar_t>();
    // Parallel over column blocks; within a block the ids are visited in order, so repeated
    // ids accumulate in order of i, deterministically.
    const int64_t block = std::max<int64_t>(1, kSegmentBytes / int64_t(sizeof(scalar_t)));
    at::parallel_for(0, (S + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t lo = blk * block, hi = std::min(S, lo + block);
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* o = dst + ids[i] * S;
          const scalar_t* r = src + i * S;
          for (int64_t s = lo; s < hi; ++s)
            o[s] = static_cast<scalar_t>(static_cast<acc_t>(o[s]) + static_cast<acc_t>(r[s]));
        }
      }
    });
  });
}

}  // namespace hecate::cpu
