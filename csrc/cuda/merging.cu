// Family-1 CUDA kernels: magnitude top-k thresholds (radix select), l1 norms and the fused merge pass.
// Plain CUDA + cub, no torch headers (csrc/cuda/bindings.cpp is the torch glue). The per-element logic and the
// radix bookkeeping live in common/fused_element.h and common/radix.h, shared with the host tests.
//
// Bit-exactness: thresholds and masks are integer logic and exact on any build. The merged values match the
// reference to fp32 rounding only when this file is compiled with -fmad=false (nvcc contracts a*b+c into FMA
// by default, which merge_math.h rules out).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/fused_element.h"
#include "common/radix.h"
#include "cuda/merging.h"

namespace pykernels {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr uint32_t kNoKey = 0xFFFFFFFFu;  // above every magnitude key (< 2^31): "no element here"

constexpr int kHistThreads = 1024;  // histogram passes
constexpr int kHistUnroll = 4;      // elements per lane per warp tile (independent loads in flight)
constexpr int64_t kHistTile = 32 * kHistUnroll;
constexpr size_t kHistSharedBytes = sizeof(uint32_t) * kRadixHiBins;  // 128 KiB privatised histogram
constexpr int64_t kMaxBlockElements = int64_t(1) << 31;                // keeps 32-bit shared counters exact
constexpr int kFindThreads = 1024;  // one block per model: bucket / chunk search
constexpr int kTieThreads = 256;
constexpr int64_t kTieChunk = 16384;  // elements per tie-count chunk
constexpr int kL1Threads = 256;
constexpr int64_t kL1Chunk = 65536;  // fixed-size chunk of one l1 partial sum
constexpr int kMergeThreads = 256;
constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct TopkArgs {
  DeltaInputs in;
  uint64_t k[kMaxModels];
  int hist_of[kMaxModels];  // histogram_owner(): the model whose pass-1 histogram serves model m
};

struct TopkLayout {
  size_t hist_hi, hist_lo, last_lo, tie_counts, state, zeroed_bytes, total;
  int64_t nchunks;
};

TopkLayout topk_layout(int n, int64_t numel) {
  TopkLayout l;
  l.nchunks = ceil_div(numel, kTieChunk);
  const size_t bins = sizeof(uint64_t) * static_cast<size_t>(n);
  l.hist_hi = 0;
  l.hist_lo = l.hist_hi + align_up(bins * kRadixHiBins);
  l.last_lo = l.hist_lo + align_up(bins * kRadixLoBins);
  l.tie_counts = l.last_lo + align_up(bins * kRadixLoBins);
  l.zeroed_bytes = l.tie_counts;  // the histograms start at zero; tie counts and state are always written
  l.state = l.tie_counts + align_up(bins * static_cast<size_t>(l.nchunks > 0 ? l.nchunks : 1));
  l.total = l.state + align_up(sizeof(TopkState) * static_cast<size_t>(n));
  return l;
}

template <typename T>
T* at_offset(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

struct DeviceInfo {
  int sms;
  int smem_optin;
};

cudaError_t device_info(DeviceInfo* info) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
}

// Blocks per model for a grid-stride pass over numel elements: about one full wave of resident blocks shared
// by the n models, no more blocks than tiles, and few enough elements per block for 32-bit counters.
int64_t blocks_per_model(int resident_blocks, int n, int64_t numel) {
  int64_t bx = ceil_div(resident_blocks > 0 ? resident_blocks : 1, n);
  bx = std::min<int64_t>(bx, ceil_div(numel, kHistThreads * kHistUnroll));
  bx = std::max<int64_t>(bx, ceil_div(numel, kMaxBlockElements));
  return std::max<int64_t>(std::min<int64_t>(bx, 0x7FFFFFFF), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Block-wide rank search: the bin holding the rank-th element of counts[0, n) scanned in descending or
// ascending bin order (common/radix.h); every thread gets the result. Requires blockDim.x == kFindThreads.
__device__ int64_t block_find_rank(const uint64_t* __restrict__ counts, int64_t n, uint64_t rank, bool descending,
                                   uint64_t* remaining) {
  using Scan = cub::BlockScan<unsigned long long, kFindThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ long long found_bin;
  __shared__ unsigned long long found_remaining;
  const int t = threadIdx.x;
  const int64_t begin = segment_begin(t, n, kFindThreads), end = segment_end(t, n, kFindThreads);
  unsigned long long total = 0;
  for (int64_t pos = begin; pos < end; ++pos) total += counts[scan_bin(pos, n, descending)];
  if (t == 0) {
    found_bin = -1;
    found_remaining = 0;
  }
  unsigned long long prefix = 0;
  Scan(scan_storage).ExclusiveSum(total, prefix);
  __syncthreads();
  if (segment_holds_rank(prefix, total, rank)) {
    uint64_t left = 0;
    found_bin = find_rank(counts, n, begin, end, rank - prefix, descending, &left);
    found_remaining = left;
  }
  __syncthreads();
  *remaining = found_remaining;
  return found_bin;
}

// Loads a warp tile row: key of element j (kNoKey past the end).
__device__ __forceinline__ uint32_t key_at(const DeltaInputs& in, int m, int64_t j) {
  if (j >= in.numel) return kNoKey;
  return magnitude_key(load_delta(in, m, j, load_base(in, j)));
}

// Pass 1: histogram of the top 16 bits of every model's keys (grid.y = model). kShared: 32-bit counters in a
// 128 KiB privatised shared histogram flushed to the global uint64 one; else global atomics directly.
// A warp whose valid keys all fall in one bin adds them with a single atomic (e.g. runs of zero deltas).
template <bool kShared>
__global__ void __launch_bounds__(kHistThreads)
    topk_hist_hi_kernel(const __grid_constant__ TopkArgs a, uint64_t* __restrict__ hist_hi) {
  extern __shared__ uint32_t shared_hist[];
  const int m = blockIdx.y;
  if (a.k[m] == 0 || a.hist_of[m] != m) return;  // nothing to select, or a repeat served by its first listing
  unsigned long long* global_hist = reinterpret_cast<unsigned long long*>(hist_hi) + int64_t(m) * kRadixHiBins;
  if (kShared) {
    for (int i = threadIdx.x; i < kRadixHiBins; i += blockDim.x) shared_hist[i] = 0;
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  for (int64_t t0 = warp * kHistTile; t0 < a.in.numel; t0 += warps * kHistTile) {  // warp-uniform loop
    uint32_t key[kHistUnroll];
#pragma unroll
    for (int u = 0; u < kHistUnroll; ++u) key[u] = key_at(a.in, m, t0 + u * 32 + lane);
#pragma unroll
    for (int u = 0; u < kHistUnroll; ++u) {
      const bool valid = key[u] != kNoKey;
      const uint32_t bin = valid ? radix_hi(key[u]) : 0u;
      const unsigned valid_mask = __ballot_sync(kFullMask, valid);
      if (valid_mask == 0) continue;
      const uint32_t first = __shfl_sync(kFullMask, bin, __ffs(valid_mask) - 1);
      const bool uniform = __all_sync(kFullMask, !valid || bin == first);
      if (uniform) {
        if (lane == 0) {
          if (kShared) {
            atomicAdd(&shared_hist[first], static_cast<uint32_t>(__popc(valid_mask)));
          } else {
            atomicAdd(&global_hist[first], static_cast<unsigned long long>(__popc(valid_mask)));
          }
        }
      } else if (valid) {
        if (kShared) {
          atomicAdd(&shared_hist[bin], 1u);
        } else {
          atomicAdd(&global_hist[bin], 1ull);
        }
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int i = threadIdx.x; i < kRadixHiBins; i += blockDim.x) {
      const uint32_t c = shared_hist[i];
      if (c != 0) atomicAdd(&global_hist[i], static_cast<unsigned long long>(c));
    }
  }
}

// Bucket search after pass 1 (one block per model); k == 0 models are answered here.
__global__ void __launch_bounds__(kFindThreads)
    topk_find_hi_kernel(const __grid_constant__ TopkArgs a, const uint64_t* __restrict__ hist_hi,
                        TopkState* __restrict__ state, int64_t* __restrict__ out) {
  const int m = blockIdx.x;
  const uint64_t k = a.k[m];
  if (k == 0) {
    if (threadIdx.x == 0) {
      state[m] = TopkState{kTopkDone, 0, 0, 0, 0};
      out[2 * m] = kKeepNone;
      out[2 * m + 1] = -1;
    }
    return;
  }
  uint64_t remaining = 0;
  const int64_t bucket =
      block_find_rank(hist_hi + int64_t(a.hist_of[m]) * kRadixHiBins, kRadixHiBins, k, true, &remaining);
  if (threadIdx.x == 0) {
    if (bucket < 0) {  // impossible when k <= numel: report an invalid threshold rather than a plausible one
      state[m] = TopkState{kTopkDone, 0, 0, 0, 0};
      out[2 * m] = -1;
      out[2 * m + 1] = -1;
    } else {
      state[m] = TopkState{kTopkRefine, static_cast<uint32_t>(bucket), 0, 0, remaining};
    }
  }
}

// Pass 2: histogram of the low 16 bits of the keys inside the selected bucket, plus the largest index per low
// bin (the cutoff when every tie at the k-th key is kept). Elements in the bucket are few, so global atomics,
// aggregated per warp over equal bins.
__global__ void __launch_bounds__(kHistThreads)
    topk_hist_lo_kernel(const __grid_constant__ TopkArgs a, const TopkState* __restrict__ state,
                        uint64_t* __restrict__ hist_lo, uint64_t* __restrict__ last_lo) {
  const int m = blockIdx.y;
  if (state[m].phase != kTopkRefine) return;
  const uint32_t bucket = state[m].bucket;
  unsigned long long* count = reinterpret_cast<unsigned long long*>(hist_lo) + int64_t(m) * kRadixLoBins;
  unsigned long long* last = reinterpret_cast<unsigned long long*>(last_lo) + int64_t(m) * kRadixLoBins;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  for (int64_t t0 = warp * kHistTile; t0 < a.in.numel; t0 += warps * kHistTile) {  // warp-uniform loop
    uint32_t key[kHistUnroll];
#pragma unroll
    for (int u = 0; u < kHistUnroll; ++u) key[u] = key_at(a.in, m, t0 + u * 32 + lane);
#pragma unroll
    for (int u = 0; u < kHistUnroll; ++u) {
      const bool in_bucket = key[u] != kNoKey && radix_hi(key[u]) == bucket;
      const unsigned in_mask = __ballot_sync(kFullMask, in_bucket);
      if (in_mask == 0) continue;
      if (in_bucket) {
        const uint32_t lo = radix_lo(key[u]);
        const unsigned group = __match_any_sync(in_mask, lo);
        if (lane == __ffs(group) - 1) atomicAdd(&count[lo], static_cast<unsigned long long>(__popc(group)));
        if (lane == 31 - __clz(group)) {  // the group's highest lane holds its largest index
          atomicMax(&last[lo], static_cast<unsigned long long>(t0 + u * 32 + lane));
        }
      }
    }
  }
}

// Search inside the bucket: the exact k-th key and the rank among its ties.
__global__ void __launch_bounds__(kFindThreads)
    topk_find_lo_kernel(const uint64_t* __restrict__ hist_lo, const uint64_t* __restrict__ last_lo,
                        TopkState* __restrict__ state, int64_t* __restrict__ out) {
  const int m = blockIdx.x;
  const TopkState s = state[m];
  if (s.phase != kTopkRefine) return;
  const uint64_t* count = hist_lo + int64_t(m) * kRadixLoBins;
  uint64_t remaining = 0;
  const int64_t lo = block_find_rank(count, kRadixLoBins, s.rank, true, &remaining);
  if (threadIdx.x == 0) {
    if (lo < 0) {
      state[m] = TopkState{kTopkDone, 0, 0, 0, 0};
      out[2 * m] = -1;
      out[2 * m + 1] = -1;
      return;
    }
    const uint32_t key = radix_join(s.bucket, static_cast<uint32_t>(lo));
    if (all_ties_kept(remaining, count[lo])) {
      state[m] = TopkState{kTopkDone, s.bucket, key, 0, 0};
      out[2 * m] = key;
      out[2 * m + 1] = static_cast<int64_t>(last_lo[int64_t(m) * kRadixLoBins + lo]);
    } else {
      state[m] = TopkState{kTopkTies, s.bucket, key, 0, remaining};
    }
  }
}

// Pass 3 (only models with phase kTopkTies): number of elements with the exact k-th key per fixed chunk.
__global__ void __launch_bounds__(kTieThreads)
    topk_tie_count_kernel(const __grid_constant__ TopkArgs a, const TopkState* __restrict__ state,
                          uint64_t* __restrict__ tie_counts, int64_t nchunks) {
  using Reduce = cub::BlockReduce<unsigned int, kTieThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int m = blockIdx.y;
  if (state[m].phase != kTopkTies) return;
  const uint32_t key = state[m].key;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const int64_t begin = chunk * kTieChunk;
    const int64_t end = begin + kTieChunk < a.in.numel ? begin + kTieChunk : a.in.numel;
    unsigned int ties = 0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kTieThreads) ties += key_at(a.in, m, j) == key;
    const unsigned int total = Reduce(reduce_storage).Sum(ties);
    if (threadIdx.x == 0) tie_counts[int64_t(m) * nchunks + chunk] = total;
    __syncthreads();  // reduce_storage is reused by the next chunk
  }
}

// The chunk holding the rank-th tie, then the tie itself, scanning the chunk in index order.
__global__ void __launch_bounds__(kFindThreads)
    topk_tie_find_kernel(const __grid_constant__ TopkArgs a, TopkState* __restrict__ state,
                         const uint64_t* __restrict__ tie_counts, int64_t nchunks, int64_t* __restrict__ out) {
  using Scan = cub::BlockScan<unsigned int, kFindThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ long long cutoff;
  const int m = blockIdx.x;
  const TopkState s = state[m];
  if (s.phase != kTopkTies) return;
  uint64_t rank = 0;
  const int64_t chunk = block_find_rank(tie_counts + int64_t(m) * nchunks, nchunks, s.rank, false, &rank);
  if (threadIdx.x == 0) cutoff = -1;
  __syncthreads();
  if (chunk >= 0) {
    const int64_t begin = chunk * kTieChunk;
    const int64_t end = begin + kTieChunk < a.in.numel ? begin + kTieChunk : a.in.numel;
    uint64_t before = 0;  // ties in the earlier tiles of the chunk (block-uniform)
    for (int64_t t0 = begin; t0 < end; t0 += kFindThreads) {
      const int64_t j = t0 + threadIdx.x;
      const unsigned int tie = j < end && key_at(a.in, m, j) == s.key ? 1u : 0u;
      unsigned int inclusive = 0, tile_total = 0;
      Scan(scan_storage).InclusiveSum(tie, inclusive, tile_total);
      if (tie && before + inclusive == rank) cutoff = j;
      before += tile_total;
      __syncthreads();  // cutoff is visible, scan_storage may be reused
      if (before >= rank) break;
    }
  }
  if (threadIdx.x == 0) {
    state[m] = TopkState{kTopkDone, s.bucket, s.key, 0, 0};
    out[2 * m] = cutoff >= 0 ? static_cast<int64_t>(s.key) : -1;
    out[2 * m + 1] = cutoff;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel parameters stay under the classic 4 KiB limit.
static_assert(sizeof(TopkArgs) <= 4096, "TopkArgs too large for kernel parameters");

struct L1Args {
  DeltaInputs in;
  SparsifyArgs sparsify;
};

// Partial (sum |d|, sum kept |d|) of each fixed chunk of kL1Chunk elements: thread t adds elements
// begin + t, begin + t + kL1Threads, ... in order, then a fixed-shape block reduction. Deterministic.
__global__ void __launch_bounds__(kL1Threads)
    l1_partial_kernel(const __grid_constant__ L1Args a, double* __restrict__ partials, int64_t nchunks) {
  using Reduce = cub::BlockReduce<double, kL1Threads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int m = blockIdx.y;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const int64_t begin = chunk * kL1Chunk;
    const int64_t end = begin + kL1Chunk < a.in.numel ? begin + kL1Chunk : a.in.numel;
    double all = 0.0, kept = 0.0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kL1Threads) {
      const float d = load_delta(a.in, m, j, load_base(a.in, j));
      const double magnitude = fabs(static_cast<double>(d));
      all += magnitude;
      if (keep_element(a.sparsify, m, d, j)) kept += magnitude;
    }
    const double all_total = Reduce(reduce_storage).Sum(all);
    __syncthreads();
    const double kept_total = Reduce(reduce_storage).Sum(kept);
    if (threadIdx.x == 0) {
      partials[2 * (int64_t(m) * nchunks + chunk)] = all_total;
      partials[2 * (int64_t(m) * nchunks + chunk) + 1] = kept_total;
    }
    __syncthreads();
  }
}

// Sum of the partials of one model (one block per model), in a fixed order.
__global__ void __launch_bounds__(kFindThreads)
    l1_reduce_kernel(const double* __restrict__ partials, int64_t nchunks, double* __restrict__ out) {
  using Reduce = cub::BlockReduce<double, kFindThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int m = blockIdx.x;
  const double* p = partials + 2 * int64_t(m) * nchunks;
  double all = 0.0, kept = 0.0;
  for (int64_t c = threadIdx.x; c < nchunks; c += kFindThreads) {
    all += p[2 * c];
    kept += p[2 * c + 1];
  }
  const double all_total = Reduce(reduce_storage).Sum(all);
  __syncthreads();
  const double kept_total = Reduce(reduce_storage).Sum(kept);
  if (threadIdx.x == 0) {
    out[2 * m] = all_total;
    out[2 * m + 1] = kept_total;
  }
}

// ---------------------------------------------------------------------------------------------------------
struct MergeKernelArgs {
  DeltaInputs in;
  SparsifyArgs sparsify;
  MergeSettings settings;
  int out_dtype;
  void* out;
};

static_assert(sizeof(L1Args) <= 4096, "L1Args too large for kernel parameters");
static_assert(sizeof(MergeKernelArgs) <= 4096, "MergeKernelArgs too large for kernel parameters");

// One thread per element (grid-stride): loads every model once, merges, writes the output once.
__global__ void __launch_bounds__(kMergeThreads) fused_merge_kernel(const __grid_constant__ MergeKernelArgs a) {
  const MergeParams p = merge_params_of(a.settings, a.in.n, a.in.base != nullptr);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < a.in.numel; j += stride) {
    store_from_float(a.out, a.out_dtype, j, fused_merge_element(a.in, a.sparsify, p, j));
  }
}

__global__ void __launch_bounds__(kMergeThreads)
    philox_kernel(uint64_t seed, int64_t offset, int64_t n, float* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = pykernels::philox_uniform(seed, offset + i);
  }
}

// Grid of a one-thread-per-element grid-stride kernel: enough blocks for every element, at most 32 waves.
int elementwise_blocks(int64_t numel, int threads, int sms) {
  const int64_t wanted = ceil_div(numel, threads);
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

bool valid_inputs(const DeltaInputs& in) { return in.n >= 1 && in.n <= kMaxModels && in.numel >= 0; }

// A known sparsifier code, with the device thresholds it reads (magnitude: (n, 2), band: (n, 4)).
bool valid_sparsify(const SparsifyArgs& s) {
  if (s.sparsifier < kNoSparsify || s.sparsifier > kBand) return false;
  return threshold_columns(s.sparsifier) == 0 || s.thresholds != nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
size_t delta_topk_workspace_bytes(int n, int64_t numel) { return topk_layout(n, numel).total; }

cudaError_t delta_topk_thresholds(const DeltaInputs& in, const int64_t* ks, void* workspace,
                                  size_t workspace_bytes, int64_t* out, cudaStream_t stream) {
  if (!valid_inputs(in)) return cudaErrorInvalidValue;
  const TopkLayout layout = topk_layout(in.n, in.numel);
  if (workspace_bytes < layout.total) return cudaErrorInvalidValue;
  TopkArgs a;
  a.in = in;
  bool any = false;
  for (int m = 0; m < kMaxModels; ++m) {
    const int64_t k = m < in.n ? ks[m] : 0;
    if (k < 0 || k > in.numel) return cudaErrorInvalidValue;
    a.k[m] = static_cast<uint64_t>(k);
    any = any || k > 0;
  }
  for (int m = 0; m < kMaxModels; ++m) a.hist_of[m] = m < in.n ? histogram_owner(in, ks, m) : m;
  uint64_t* hist_hi = at_offset<uint64_t>(workspace, layout.hist_hi);
  uint64_t* hist_lo = at_offset<uint64_t>(workspace, layout.hist_lo);
  uint64_t* last_lo = at_offset<uint64_t>(workspace, layout.last_lo);
  uint64_t* tie_counts = at_offset<uint64_t>(workspace, layout.tie_counts);
  TopkState* state = at_offset<TopkState>(workspace, layout.state);
  cudaError_t err;
  if (!any) {  // every k is 0: just write (2^32, -1) rows
    topk_find_hi_kernel<<<in.n, kFindThreads, 0, stream>>>(a, hist_hi, state, out);
    return cudaGetLastError();
  }
  err = cudaMemsetAsync(workspace, 0, layout.zeroed_bytes, stream);
  if (err != cudaSuccess) return err;
  DeviceInfo info;
  err = device_info(&info);
  if (err != cudaSuccess) return err;

  // pass 1: top-16-bit histograms of all models
  bool shared = static_cast<size_t>(info.smem_optin) >= kHistSharedBytes;
  if (shared) {
    shared = cudaFuncSetAttribute(topk_hist_hi_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kHistSharedBytes)) == cudaSuccess;
    if (!shared) (void)cudaGetLastError();  // fall back to global atomics
  }
  int per_sm = 0;
  if (shared) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk_hist_hi_kernel<true>, kHistThreads,
                                                        kHistSharedBytes);
  } else {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk_hist_hi_kernel<false>, kHistThreads, 0);
  }
  if (err != cudaSuccess) return err;
  const dim3 hist_grid(static_cast<unsigned>(blocks_per_model(info.sms * std::max(per_sm, 1), in.n, in.numel)),
                       in.n);
  if (shared) {
    topk_hist_hi_kernel<true><<<hist_grid, kHistThreads, kHistSharedBytes, stream>>>(a, hist_hi);
  } else {
    topk_hist_hi_kernel<false><<<hist_grid, kHistThreads, 0, stream>>>(a, hist_hi);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  topk_find_hi_kernel<<<in.n, kFindThreads, 0, stream>>>(a, hist_hi, state, out);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // pass 2: low-16-bit histograms inside each model's bucket
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk_hist_lo_kernel, kHistThreads, 0);
  if (err != cudaSuccess) return err;
  const dim3 lo_grid(static_cast<unsigned>(blocks_per_model(info.sms * std::max(per_sm, 1), in.n, in.numel)),
                     in.n);
  topk_hist_lo_kernel<<<lo_grid, kHistThreads, 0, stream>>>(a, state, hist_lo, last_lo);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  topk_find_lo_kernel<<<in.n, kFindThreads, 0, stream>>>(hist_lo, last_lo, state, out);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // pass 3: tie counts per chunk, for the models that keep only some of the ties (others exit at once)
  const int64_t tie_blocks = std::min<int64_t>(layout.nchunks, 1 << 20);
  const dim3 tie_grid(static_cast<unsigned>(std::max<int64_t>(tie_blocks, 1)), in.n);
  topk_tie_count_kernel<<<tie_grid, kTieThreads, 0, stream>>>(a, state, tie_counts, layout.nchunks);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  topk_tie_find_kernel<<<in.n, kFindThreads, 0, stream>>>(a, state, tie_counts, layout.nchunks, out);
  return cudaGetLastError();
}

size_t delta_l1_workspace_bytes(int n, int64_t numel) {
  return align_up(sizeof(double) * 2 * static_cast<size_t>(n) *
                  static_cast<size_t>(std::max<int64_t>(ceil_div(numel, kL1Chunk), 1)));
}

cudaError_t delta_l1_norms(const DeltaInputs& in, const SparsifyArgs& sparsify, void* workspace,
                           size_t workspace_bytes, double* out, cudaStream_t stream) {
  if (!valid_inputs(in)) return cudaErrorInvalidValue;
  if (workspace_bytes < delta_l1_workspace_bytes(in.n, in.numel)) return cudaErrorInvalidValue;
  if (!valid_sparsify(sparsify)) return cudaErrorInvalidValue;
  const int64_t nchunks = ceil_div(in.numel, kL1Chunk);
  double* partials = static_cast<double*>(workspace);
  L1Args a;
  a.in = in;
  a.sparsify = sparsify;
  if (nchunks > 0) {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(nchunks, 1 << 20)), in.n);
    l1_partial_kernel<<<grid, kL1Threads, 0, stream>>>(a, partials, nchunks);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  l1_reduce_kernel<<<in.n, kFindThreads, 0, stream>>>(partials, nchunks, out);
  return cudaGetLastError();
}

cudaError_t fused_merge(const DeltaInputs& in, const SparsifyArgs& sparsify, const MergeSettings& settings,
                        void* out, int out_dtype, cudaStream_t stream) {
  if (!valid_inputs(in)) return cudaErrorInvalidValue;
  if (out_dtype != kFloat32 && out_dtype != kBFloat16 && out_dtype != kFloat16) return cudaErrorInvalidValue;
  if (!valid_sparsify(sparsify)) return cudaErrorInvalidValue;
  if (in.numel == 0) return cudaSuccess;
  MergeKernelArgs a;
  a.in = in;
  a.sparsify = sparsify;
  a.settings = settings;
  a.out_dtype = out_dtype;
  a.out = out;
  DeviceInfo info;
  const cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  fused_merge_kernel<<<elementwise_blocks(in.numel, kMergeThreads, info.sms), kMergeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t philox_uniform(uint64_t seed, int64_t offset, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  DeviceInfo info;
  const cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  philox_kernel<<<elementwise_blocks(n, kMergeThreads, info.sms), kMergeThreads, 0, stream>>>(seed, offset, n, out);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pykernels
