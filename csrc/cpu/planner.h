// The FSSDP planner's stages on raw arrays, shared by their own ops (place_experts in
// placement.cpp, fit_replicas in fit.cpp, route_layout in routes.cpp, sparse_plan in plan.cpp)
// and by plan_layer (plan_layer.cpp), which runs them all in one call. Inputs are trusted to
// be contiguous and of the right shapes (the ops check those); values that could make an
// index go out of bounds (owners, nodes) are still checked here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace hecate::cpu::planner {

// Nodes 0..N-1 of the W ranks (checked to be in [0, W)); returns N.
int64_t count_nodes(const int64_t* node, int64_t W);

// Algorithm 1 (materialize.HecatePolicy.place) into h (bool [W, E], all false on entry).
void place(bool* h, const double* load, const int64_t* owner, const int64_t* node, int64_t W, int64_t E,
           int64_t m, int64_t t);

// materialize.fit_holders into out (bool [W, E], all false on entry); counts already checked
// non-negative (and finite).
template <class T>
void fit(const bool* h, bool* out, const int64_t* owner, const T* counts, int64_t W, int64_t E, int64_t cost,
         int64_t token_bytes, int64_t m, double fixed_bytes);

// One rank's side of the token routes (routes.TokenRoutes.layout); counts already checked
// non-negative. rank = -1: only index and check the holders (the tensors are left undefined).
struct Layout {
  int64_t H = 0;      // holders in P1
  at::Tensor sends;   // int64 [3, S]: expert, destination, tokens of each send, by (expert, destination)
  at::Tensor recv_WE;  // int64 [W_src, E]
  at::Tensor splits;  // int64 [2, W]: tokens sent to / received from each peer
};
Layout route_layout(const bool* h, const int64_t* counts, const int64_t* node, int64_t W, int64_t E,
                    int64_t rank, const at::TensorOptions& opts);

// hecate.comm.sparse.plan_sparse's nine tensors: send_ids, send_counts, recv_ids, recv_counts,
// owned_ids, held_ids, send_rows, recv_rows, owned_rows_M.
std::vector<at::Tensor> sparse_plan(const int64_t* owner, const bool* holds, int64_t W, int64_t C, int64_t rank,
                                    const at::TensorOptions& opts);

}  // namespace hecate::cpu::planner
