// permute: group token rows by destination bin (expert, or rank * E_local + expert).
//
// Routing is computed with stable radix sorts (cub::DeviceRadixSort is stable), which give
// every ordering docs/ops.md asks for:
//   - capacity by position: sort entries by bin, fed in GShard (k-major) order, so the rank
//     of an entry inside its bin is its GShard position; keep rank < capacity.
//   - capacity by priority: first sort by priority descending, fed in (t, k) order (so ties
//     keep lower token, then lower k), then stably by bin; keep rank < capacity.
//   - final layout: kept entries sorted by bin, fed in (t, k) order, so rows within a bin are
//     ordered by token index; the sorted position is the row.
// The data copy (gather_rows) is a separate launch because x_ND's row count is only known
// once the counts are back on the host.
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "histogram.cuh"
#include "row_copy.cuh"

namespace hecate::cuda {
namespace {

constexpr int kThreads = 256;

// Dropped and unrouted entries get key B, so they sort after every real bin.
__device__ __forceinline__ uint32_t bin_key(int64_t bin, int64_t B) {
  return (bin >= 0 && bin < B) ? static_cast<uint32_t>(bin) : static_cast<uint32_t>(B);
}

#define HECATE_GRID_STRIDE(i, n)                                                        \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// keys[e] = bin key of entry e; vals[e] = e (entries in (t, k) order).
__global__ void keys_in_token_order(const int64_t* __restrict__ bins, int64_t n, int64_t B,
                                    uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  HECATE_GRID_STRIDE(e, n) {
    keys[e] = bin_key(bins[e], B);
    vals[e] = static_cast<int32_t>(e);
  }
}

// Position j = k * T + t walks the entries in GShard order (every 1st choice, then every 2nd).
__global__ void keys_in_gshard_order(const int64_t* __restrict__ bins, int64_t T, int64_t K, int64_t B,
                                     uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  HECATE_GRID_STRIDE(j, T * K) {
    const int64_t e = (j % T) * K + j / T;
    keys[j] = bin_key(bins[e], B);
    vals[j] = static_cast<int32_t>(e);
  }
}

__global__ void iota(int64_t n, int32_t* __restrict__ vals) {
  HECATE_GRID_STRIDE(i, n) vals[i] = static_cast<int32_t>(i);
}

// keys[p] = bin key of the entry at position p of a given order.
__global__ void keys_of_order(const int64_t* __restrict__ bins, const int32_t* __restrict__ order,
                              int64_t n, int64_t B, uint32_t* __restrict__ keys) {
  HECATE_GRID_STRIDE(p, n) keys[p] = bin_key(bins[order[p]], B);
}

// bin_start[b] = first sorted position of bin b (bins that do not occur are never read).
__global__ void mark_bin_starts(const uint32_t* __restrict__ sorted_keys, int64_t n, int64_t B,
                                int32_t* __restrict__ bin_start) {
  HECATE_GRID_STRIDE(p, n) {
    const uint32_t key = sorted_keys[p];
    if (key < B && (p == 0 || sorted_keys[p - 1] != key)) bin_start[key] = static_cast<int32_t>(p);
  }
}

// Keeps the first `capacity` entries of each bin (in sorted order); the rest get key B.
__global__ void apply_capacity(const uint32_t* __restrict__ sorted_keys,
                               const int32_t* __restrict__ sorted_entries,
                               const int32_t* __restrict__ bin_start, int64_t n, int64_t B,
                               int64_t capacity, uint32_t* __restrict__ kept_keys) {
  HECATE_GRID_STRIDE(p, n) {
    const uint32_t key = sorted_keys[p];
    const bool kept = key < B && p - bin_start[key] < capacity;
    kept_keys[sorted_entries[p]] = kept ? key : static_cast<uint32_t>(B);
  }
}

__global__ void write_row_map(const uint32_t* __restrict__ sorted_keys,
                              const int32_t* __restrict__ sorted_entries, int64_t n, int64_t B,
                              int64_t* __restrict__ row_map) {
  HECATE_GRID_STRIDE(p, n) row_map[sorted_entries[p]] = sorted_keys[p] < B ? p : -1;
}

// One block per token: read each vector of x[t] once and store it to every kept row.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ row_map,
                                   int64_t T, int64_t K, int64_t row_vecs, V* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t* rows = row_map + t * K;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) {
      const V value = x[t * row_vecs + v];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = rows[k];
        if (r >= 0) out[r * row_vecs + v] = value;
      }
    }
  }
}

int key_bits(int64_t B) {  // bits that hold every key in [0, B]
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= B) ++bits;
  return bits;
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Sub-buffers of the workspace; `base` null only sizes them.
struct Workspace {
  uint32_t* keys_a = nullptr;
  uint32_t* keys_b = nullptr;
  int32_t* vals_a = nullptr;
  int32_t* vals_b = nullptr;
  double* priority_sorted = nullptr;
  int32_t* bin_start = nullptr;
  void* cub_temp = nullptr;
  size_t cub_bytes = 0;
  size_t total = 0;

  Workspace(char* base, int64_t n, int64_t B, bool capacity, bool priority) {
    size_t offset = 0;
    auto take = [&](size_t bytes) -> char* {
      char* p = base ? base + offset : nullptr;
      offset += align_up(bytes);
      return p;
    };
    keys_a = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * n));
    keys_b = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * n));
    vals_a = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * n));
    vals_b = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * n));
    if (priority) priority_sorted = reinterpret_cast<double*>(take(sizeof(double) * n));
    if (capacity) bin_start = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * (B > 0 ? B : 1)));
    // Size queries of cub only read the sizes, never the (null) pointers.
    size_t by_bin = 0, by_priority = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, by_bin, static_cast<const uint32_t*>(nullptr),
                                    static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                    static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, key_bits(B));
    if (priority)
      cub::DeviceRadixSort::SortPairsDescending(nullptr, by_priority, static_cast<const double*>(nullptr),
                                                static_cast<double*>(nullptr),
                                                static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<int>(n));
    cub_bytes = by_bin > by_priority ? by_bin : by_priority;
    cub_temp = take(cub_bytes);
    total = offset;
  }
};

#define HECATE_TRY(expr)                       \
  do {                                         \
    const cudaError_t err_ = (expr);           \
    if (err_ != cudaSuccess) return err_;      \
  } while (0)

}  // namespace
}  // namespace hecate::cuda

extern "C" size_t hecate_permute_workspace_bytes(int64_t T, int64_t K, int64_t B, int64_t capacity,
                                                 int has_priority) {
  return hecate::cuda::Workspace(nullptr, T * K, B, capacity >= 0, capacity >= 0 && has_priority).total;
}

extern "C" cudaError_t hecate_permute_plan(const int64_t* bins_TK, int64_t T, int64_t K, int64_t B,
                                           int64_t capacity, const double* priority_TK,
                                           int64_t* row_map_TK, int64_t* counts_B, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream) {
  using namespace hecate::cuda;
  const int64_t n = T * K;
  if (T < 0 || K < 0 || B < 0 || B >= INT_MAX || n >= INT_MAX) return cudaErrorInvalidValue;
  if (n == 0) return launch_histogram(bins_TK, 0, B, counts_B, stream);
  const bool has_capacity = capacity >= 0;
  const bool by_priority = has_capacity && priority_TK != nullptr;
  Workspace ws(static_cast<char*>(workspace), n, B, has_capacity, by_priority);
  if (workspace == nullptr || workspace_bytes < ws.total) return cudaErrorInvalidValue;
  const unsigned blocks = grid_for(n, kThreads);
  const int bits = key_bits(B);
  size_t cub_bytes = ws.cub_bytes;

  if (has_capacity) {
    // Order the entries of every bin by keep-priority, then keep the first `capacity`.
    if (by_priority) {
      iota<<<blocks, kThreads, 0, stream>>>(n, ws.vals_a);
      HECATE_TRY(cub::DeviceRadixSort::SortPairsDescending(ws.cub_temp, cub_bytes, priority_TK,
                                                           ws.priority_sorted, ws.vals_a, ws.vals_b,
                                                           static_cast<int>(n), 0, 64, stream));
      keys_of_order<<<blocks, kThreads, 0, stream>>>(bins_TK, ws.vals_b, n, B, ws.keys_a);
    } else {
      keys_in_gshard_order<<<blocks, kThreads, 0, stream>>>(bins_TK, T, K, B, ws.keys_a, ws.vals_b);
    }
    HECATE_TRY(cudaGetLastError());
    HECATE_TRY(cub::DeviceRadixSort::SortPairs(ws.cub_temp, cub_bytes, ws.keys_a, ws.keys_b, ws.vals_b,
                                               ws.vals_a, static_cast<int>(n), 0, bits, stream));
    mark_bin_starts<<<blocks, kThreads, 0, stream>>>(ws.keys_b, n, B, ws.bin_start);
    apply_capacity<<<blocks, kThreads, 0, stream>>>(ws.keys_b, ws.vals_a, ws.bin_start, n, B, capacity,
                                                    ws.keys_a);
    iota<<<blocks, kThreads, 0, stream>>>(n, ws.vals_b);
  } else {
    keys_in_token_order<<<blocks, kThreads, 0, stream>>>(bins_TK, n, B, ws.keys_a, ws.vals_b);
  }
  HECATE_TRY(cudaGetLastError());
  // keys_a[e] = kept bin of entry e (or B); vals_b[e] = e. Stable sort -> rows.
  HECATE_TRY(cub::DeviceRadixSort::SortPairs(ws.cub_temp, cub_bytes, ws.keys_a, ws.keys_b, ws.vals_b,
                                             ws.vals_a, static_cast<int>(n), 0, bits, stream));
  write_row_map<<<blocks, kThreads, 0, stream>>>(ws.keys_b, ws.vals_a, n, B, row_map_TK);
  HECATE_TRY(cudaGetLastError());
  return launch_histogram(ws.keys_b, n, B, counts_B, stream);
}

extern "C" cudaError_t hecate_gather_rows(const void* x_TD, const int64_t* row_map_TK, int64_t T,
                                          int64_t K, int64_t row_bytes, void* x_ND,
                                          cudaStream_t stream) {
  using namespace hecate::cuda;
  if (T < 0 || K < 0 || row_bytes < 0) return cudaErrorInvalidValue;
  if (T == 0 || K == 0 || row_bytes == 0) return cudaSuccess;
  return dispatch_row_vector(row_bytes, x_TD, x_ND, [&](auto vec) {
    using V = decltype(vec);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
    gather_rows_kernel<V><<<grid_for(T, 1), row_threads(row_vecs), 0, stream>>>(
        static_cast<const V*>(x_TD), row_map_TK, T, K, row_vecs, static_cast<V*>(x_ND));
    return cudaGetLastError();
  });
}
