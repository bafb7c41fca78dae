// plan_sparse_collective: who sends which chunks to whom in one spAG (spRS swaps the roles).
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "ops.h"
#include "planner.h"

namespace hecate::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_sparse_collective(
    const at::Tensor& owner_C, const at::Tensor& holders_WC, int64_t rank) {
  TORCH_CHECK_VALUE(owner_C.dim() == 1 && owner_C.scalar_type() == at::kLong,
                    "owner_C must be a 1-D int64 tensor, got ", owner_C.sizes(), " ", owner_C.scalar_type());
  TORCH_CHECK_VALUE(holders_WC.dim() == 2 && holders_WC.scalar_type() == at::kBool,
                    "holders_WC must be a 2-D bool tensor, got ", holders_WC.sizes(), " ",
                    holders_WC.scalar_type());
  const int64_t W = holders_WC.size(0), C = holders_WC.size(1);
  TORCH_CHECK_VALUE(owner_C.size(0) == C, "owner_C must have ", C, " entries (columns of holders_WC), got ",
                    owner_C.size(0));
  TORCH_CHECK_VALUE(rank >= 0 && rank < W, "rank must be in [0, ", W, "), got ", rank);
  auto owner_c = owner_C.contiguous();
  auto holders_c = holders_WC.contiguous();
  const int64_t* owner = owner_c.const_data_ptr<int64_t>();
  const bool* holds = holders_c.const_data_ptr<bool>();
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(owner[c] >= 0 && owner[c] < W, "owner_C[", c, "] = ", owner[c],
                      " is out of range [0, ", W, "): every chunk needs one owner");
    TORCH_CHECK_VALUE(holds[owner[c] * C + c], "owner ", owner[c], " of chunk ", c,
                      " is not among its holders (holders_WC[", owner[c], ", ", c,
                      "] is False): P0 must be a subset of P1");
  }
  std::vector<int64_t> send_ids, recv_ids, send_counts(W, 0), recv_counts(W, 0);
  for (int64_t peer = 0; peer < W; ++peer) {
    if (peer == rank) continue;
    for (int64_t c = 0; c < C; ++c) {
      if (owner[c] == rank && holds[peer * C + c]) {
        send_ids.push_back(c);
        ++send_counts[peer];
      }
      if (owner[c] == peer && holds[rank * C + c]) {
        recv_ids.push_back(c);
        ++recv_counts[peer];
      }
    }
  }
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    auto t = at::empty({static_cast<int64_t>(v.size())}, owner_C.options());
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
    return t;
  };
  return {as_tensor(send_ids), as_tensor(send_counts), as_tensor(recv_ids), as_tensor(recv_counts)};
}

}  // namespace hecate::cpu

// sparse_plan: everything hecate/comm/sparse.py plan_sparse returns, in one call: the ids of
// the chunks this rank sends (destinations ascending, then ids) and receives (owners
// ascending, then ids) with their per-peer counts, the chunks it owns and holds, and the row
// of each sent / received / owned chunk in the owned and materialized buffers. It reads only
// the holders of the chunks the rank owns and its own row: O(C + W x owned chunks).
namespace hecate::cpu {
namespace {

std::vector<at::Tensor> sparse_plan(const at::Tensor& owner_C, const at::Tensor& holders_WC, int64_t rank) {
  TORCH_CHECK_VALUE(owner_C.dim() == 1 && owner_C.scalar_type() == at::kLong,
                    "owner_C must be a 1-D int64 tensor, got ", owner_C.sizes(), " ", owner_C.scalar_type());
  TORCH_CHECK_VALUE(holders_WC.dim() == 2 && holders_WC.scalar_type() == at::kBool,
                    "holders_WC must be a 2-D bool tensor, got ", holders_WC.sizes(), " ", holders_WC.scalar_type());
  const int64_t W = holders_WC.size(0), C = holders_WC.size(1);
  TORCH_CHECK_VALUE(owner_C.size(0) == C, "owner_C has ", owner_C.size(0), " entries but holders_WC has C=", C,
                    " chunk columns; give one owner per chunk");
  TORCH_CHECK_VALUE(rank >= 0 && rank < W, "rank must be an int in [0, ", W, "), got ", rank);
  auto oc = owner_C.contiguous();
  auto hc = holders_WC.contiguous();
  return planner::sparse_plan(oc.const_data_ptr<int64_t>(), hc.const_data_ptr<bool>(), W, C, rank, owner_C.options());
}

}  // namespace
namespace planner {

std::vector<at::Tensor> sparse_plan(const int64_t* owner, const bool* holds, int64_t W, int64_t C, int64_t rank,
                                    const at::TensorOptions& opts) {
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(owner[c] >= 0 && owner[c] < W, "owner_C[", c, "] = ", owner[c], " is out of range [0, ", W,
                      "): every chunk needs one owner");
    TORCH_CHECK_VALUE(holds[owner[c] * C + c], "owner ", owner[c], " of chunk ", c,
                      " is not among its holders (holders_WC[", owner[c], ", ", c,
                      "] is False): P0 must be a subset of P1");
  }
  const bool* mine = holds + rank * C;
  std::vector<int64_t> owned, held, owned_row(C, -1), held_row(C, -1), recv_counts(W, 0), send_counts(W, 0);
  for (int64_t c = 0; c < C; ++c) {
    if (owner[c] == rank) owned_row[c] = static_cast<int64_t>(owned.size()), owned.push_back(c);
    if (mine[c]) held_row[c] = static_cast<int64_t>(held.size()), held.push_back(c);
    if (mine[c] && owner[c] != rank) ++recv_counts[owner[c]];
  }
  std::vector<int64_t> send_ids, send_rows;
  for (int64_t d = 0; d < W; ++d) {
    if (d == rank) continue;
    for (int64_t c : owned) {
      if (!holds[d * C + c]) continue;
      send_ids.push_back(c), send_rows.push_back(owned_row[c]);
      ++send_counts[d];
    }
  }
  // Receives by owner, then id: a counting sort over the owners.
  std::vector<int64_t> start(W + 1, 0);
  for (int64_t d = 0; d < W; ++d) start[d + 1] = start[d] + recv_counts[d];
  std::vector<int64_t> recv_ids(start[W]), recv_rows(start[W]);
  for (int64_t c = 0; c < C; ++c) {
    if (!mine[c] || owner[c] == rank) continue;
    const int64_t i = start[owner[c]]++;
    recv_ids[i] = c, recv_rows[i] = held_row[c];
  }
  std::vector<int64_t> owned_rows_M;
  owned_rows_M.reserve(owned.size());
  for (int64_t c : owned) owned_rows_M.push_back(held_row[c]);
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    auto t = at::empty({static_cast<int64_t>(v.size())}, opts);
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
    return t;
  };
  return {as_tensor(send_ids), as_tensor(send_counts), as_tensor(recv_ids), as_tensor(recv_counts),
          as_tensor(owned), as_tensor(held), as_tensor(send_rows), as_tensor(recv_rows), as_tensor(owned_rows_M)};
}

}  // namespace planner
}  // namespace hecate::cpu

// Planner-only op: a fragment of the hecate library (csrc/ops.cpp defines the shared schemas).
TORCH_LIBRARY_FRAGMENT(hecate, m) {
  m.def("sparse_plan(Tensor owner, Tensor holders, int rank) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hecate, CPU, m) { m.impl("sparse_plan", &hecate::cpu::sparse_plan); }
