// expert_histogram: tokens per expert (or per destination bin).
#include "histogram.cuh"

extern "C" cudaError_t hecate_expert_histogram(const int64_t* indices_n, int64_t n, int64_t B,
                                               int64_t* counts_B, cudaStream_t stream) {
  if (n < 0 || B < 0) return cudaErrorInvalidValue;
  return hecate::cuda::launch_histogram(indices_n, n, B, counts_B, stream);
}
