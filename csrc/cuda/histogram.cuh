// Histogram of bin ids with shared-memory privatized counters (used by expert_histogram
// and by permute for the kept-row counts).
#pragma once

#include "common.cuh"

namespace hecate::cuda {

constexpr int kHistThreads = 256;
constexpr int64_t kMaxSmemBins = 12 * 1024;  // 48 KiB of u32 counters

// Counts ids in [0, B); other ids (dropped, unrouted) are ignored. counts_B must be zeroed.
// With `privatized`, each block counts in shared memory and adds its totals once per bin.
template <typename Id>
__global__ void histogram_kernel(const Id* __restrict__ ids, int64_t n, int64_t B, int privatized,
                                 unsigned long long* __restrict__ counts_B) {
  extern __shared__ unsigned int block_counts[];
  if (privatized) {
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) block_counts[b] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = static_cast<int64_t>(ids[i]);
    if (b < 0 || b >= B) continue;
    if (privatized) atomicAdd(&block_counts[b], 1u);
    else atomicAdd(&counts_B[b], 1ull);
  }
  if (privatized) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x)
      if (block_counts[b]) atomicAdd(&counts_B[b], static_cast<unsigned long long>(block_counts[b]));
  }
}

// Zeroes counts_B (int64) and fills it; B >= 0.
template <typename Id>
cudaError_t launch_histogram(const Id* ids, int64_t n, int64_t B, int64_t* counts_B, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(counts_B, 0, sizeof(int64_t) * B, stream);
  if (err != cudaSuccess || n == 0) return err;
  const int privatized = B <= kMaxSmemBins;
  // Privatized blocks pay O(B) to flush, so give each block a good share of the ids.
  const unsigned blocks = grid_for(n, kHistThreads * (privatized ? 8 : 1), 4096);
  const size_t smem = privatized ? sizeof(unsigned int) * B : 0;
  histogram_kernel<Id><<<blocks, kHistThreads, smem, stream>>>(
      ids, n, B, privatized, reinterpret_cast<unsigned long long*>(counts_B));
  return cudaGetLastError();
}

}  // namespace hecate::cuda
