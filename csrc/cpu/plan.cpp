// plan_sparse_collective: who sends which chunks to whom in one spAG (spRS swaps the roles).
#include <vector>

#include "common.h"
#include "ops.h"

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
