// The "cpp" issuer of spAG / spRS: the whole sparse collective (plan, pack, all-to-all on the
// c10d ProcessGroup, wait, unpack) in one call, without returning to Python in between.
// hecate/comm/sparse.py holds the Python issuer of the same exchange and the autograd wiring.
//
// The bindings release the GIL for their whole body: while one rank blocks in wait(), another
// Python thread of the same process (gloo's or the caller's) may need the GIL, and holding it
// there makes gloo ranks hang intermittently.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#include <tuple>
#include <vector>

#include "c10d_bindings.h"

namespace hecate {
namespace {

using PlanT = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The torch.ops.hecate kernels, called through the dispatcher so the tensor's device picks
// the CPU or CUDA implementation.
PlanT plan_op(const at::Tensor& owner, const at::Tensor& holders, int64_t rank) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hecate::plan_sparse_collective", "")
                       .typed<PlanT(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(owner, holders, rank);
}

at::Tensor pack_op(const at::Tensor& buffer, const at::Tensor& ids) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hecate::pack_chunks", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(buffer, ids);
}

void unpack_op(const char* name, const at::Tensor& recv, const at::Tensor& ids, const at::Tensor& out) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(name, "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(recv, ids, out);
}

// One rank's side of the exchange, with chunk ids turned into rows of the caller's buffers.
struct RankPlan {
  std::vector<int64_t> send_counts, recv_counts;  // spAG direction
  int64_t send_total = 0, recv_total = 0;
  at::Tensor held_ids;      // chunks this rank holds (rows of materialized_MS), CPU
  at::Tensor send_rows;     // owned_OS row of each chunk sent by spAG
  at::Tensor recv_rows;     // materialized_MS row of each chunk received by spAG
  at::Tensor owned_rows_M;  // materialized_MS row of each owned chunk
};

std::vector<int64_t> to_vector(const at::Tensor& t) {
  auto c = t.to(at::kCPU).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

RankPlan make_plan(const at::Tensor& owner_C, const at::Tensor& holders_WC, int64_t rank,
                   const at::Device& device) {
  auto owner = owner_C.to(at::kCPU, at::kLong).contiguous();
  auto holders = holders_WC.to(at::kCPU).contiguous();
  auto [send_ids, send_counts, recv_ids, recv_counts] = plan_op(owner, holders, rank);
  auto owned_mask = owner.eq(rank);
  auto held_mask = holders.select(0, rank);
  auto owned_row_C = owned_mask.to(at::kLong).cumsum(0) - 1;
  auto held_row_C = held_mask.to(at::kLong).cumsum(0) - 1;
  auto owned_ids = owned_mask.nonzero().view({-1});
  RankPlan plan;
  plan.send_counts = to_vector(send_counts);
  plan.recv_counts = to_vector(recv_counts);
  plan.send_total = send_ids.numel();
  plan.recv_total = recv_ids.numel();
  plan.held_ids = held_mask.nonzero().view({-1});
  plan.send_rows = owned_row_C.index_select(0, send_ids).to(device);
  plan.recv_rows = held_row_C.index_select(0, recv_ids).to(device);
  plan.owned_rows_M = held_row_C.index_select(0, owned_ids).to(device);
  return plan;
}

at::Tensor exchange(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, at::Tensor send, int64_t recv_rows,
                    std::vector<int64_t> send_splits, std::vector<int64_t> recv_splits) {
  auto recv = at::empty({recv_rows, send.size(1)}, send.options());
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  // alltoall_base exists in every torch >= 2.4 (newer ones forward it to all_to_all_single).
  auto work = pg->alltoall_base(recv, send, recv_splits, send_splits);
#pragma GCC diagnostic pop
  work->wait();
  return recv;
}

void check_buffer(const at::Tensor& buf, const char* name, int64_t rows) {
  TORCH_CHECK_VALUE(buf.dim() == 2, name, " must be 2-D [rows, S], got ", buf.sizes());
  TORCH_CHECK_VALUE(buf.size(0) == rows, name, " has ", buf.size(0), " rows, expected ", rows);
}

// spAG: returns (materialized_MS, materialized_ids_M, rows sent, rows received).
std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> sparse_all_gather_pg(
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const at::Tensor& owned_OS, const at::Tensor& owner_C,
    const at::Tensor& holders_WC, int64_t rank) {
  auto owned = owned_OS.contiguous();
  RankPlan plan = make_plan(owner_C, holders_WC, rank, owned.device());
  check_buffer(owned, "owned_OS", plan.owned_rows_M.numel());
  auto send = pack_op(owned, plan.send_rows);
  auto recv = exchange(pg, send, plan.recv_total, plan.send_counts, plan.recv_counts);
  auto out = at::empty({plan.held_ids.numel(), owned.size(1)}, owned.options());
  unpack_op("hecate::unpack_chunks", owned, plan.owned_rows_M, out);
  unpack_op("hecate::unpack_chunks", recv, plan.recv_rows, out);
  return {out, plan.held_ids.to(owned.device()), plan.send_total, plan.recv_total};
}

// spRS: returns (owned_grads_OS, rows sent, rows received).
std::tuple<at::Tensor, int64_t, int64_t> sparse_reduce_scatter_pg(
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const at::Tensor& grads_MS, const at::Tensor& owner_C,
    const at::Tensor& holders_WC, int64_t rank) {
  auto grads = grads_MS.contiguous();
  RankPlan plan = make_plan(owner_C, holders_WC, rank, grads.device());
  check_buffer(grads, "grads_MS", plan.held_ids.numel());
  auto send = pack_op(grads, plan.recv_rows);
  auto recv = exchange(pg, send, plan.send_total, plan.recv_counts, plan.send_counts);
  auto out = pack_op(grads, plan.owned_rows_M);  // the owner's own contribution first
  unpack_op("hecate::scatter_add_chunks", recv, plan.send_rows, out);
  return {out, plan.recv_total, plan.send_total};
}

}  // namespace

void register_c10d_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sparse_all_gather_pg", &sparse_all_gather_pg, py::arg("group"), py::arg("owned_OS"),
        py::arg("owner_C"), py::arg("holders_WC"), py::arg("rank"),
        py::call_guard<py::gil_scoped_release>(),
        "spAG on a c10d ProcessGroup: (materialized_MS, materialized_ids_M, rows_sent, rows_received)");
  m.def("sparse_reduce_scatter_pg", &sparse_reduce_scatter_pg, py::arg("group"), py::arg("grads_MS"),
        py::arg("owner_C"), py::arg("holders_WC"), py::arg("rank"),
        py::call_guard<py::gil_scoped_release>(),
        "spRS on a c10d ProcessGroup: (owned_grads_OS, rows_sent, rows_received)");
}

}  // namespace hecate
