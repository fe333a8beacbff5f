// MoE routing kernels: top-k gating (moe_topk_route) and vLLM's moe_align_block_size, deterministic (contract:
// docs/PRIMITIVES.md "MoE routing"). Plain CUDA, no torch headers (csrc/cuda/bindings.cpp is the torch glue).
// The selection rule, the scores and the align bookkeeping are the PK_HD helpers of common/moe_topk.h, which
// tests/test_cuda_moe_host.py runs on the host lane by lane in the order used here.
//
// moe_topk_route: one warp per token, kRouteWarps tokens a CTA. Lane l holds experts l, l + 32, ... in
// route_slots(E) register slots (E up to 1024, any E: slots past E are "unused"). Softmax takes the row max
// and sum with xor butterflies; grouped routing writes the row's keys to the warp's shared memory, where lane l
// scores groups l, l + 32, ... (a sequential scan of each group's keys) and keeps those with fewer than
// topk_groups groups ahead of them; then k argmax rounds pick the experts: each lane offers its first untaken
// slot, a butterfly keeps the first candidate in (key desc, expert asc) order -- a total order, so every lane
// agrees on the winner and the result does not depend on the reduction order -- and the owning lane takes that
// slot out. Lane j keeps the j-th winner and writes weights[t, j], ids[t, j]. Registers only (no local memory)
// for every slot count; a warp needs shared memory only for grouped routing.
//
// moe_align_block_size: (1) sorted_ids := sentinel; (2) one CTA per chunk of consecutive pairs counts its
// experts in a shared-memory histogram -> chunk_counts (chunks, E); (3) one CTA turns every expert's column into
// the chunk's start inside the expert, sums the padded runs (block scan over experts), writes
// block_expert_ids and the total; (4) one warp per chunk walks its pairs 32 at a time in ascending p, ranks each
// pair among the step's lanes with the same expert (__match_any_sync) and writes it after the chunk's earlier
// pairs of that expert. Each expert's pairs so come out in ascending p, the same on every run.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/fused_element.h"
#include "common/moe_topk.h"
#include "cuda/moe.h"

namespace pykernels {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in to more shared memory
constexpr size_t kAlign = 256;

constexpr int kRouteWarps = 4;
constexpr int kRouteThreads = kRouteWarps * kMoeLanes;

constexpr int kFillThreads = 256;
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kScatterWarps = 4;
constexpr int kScatterThreads = kScatterWarps * kMoeLanes;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// ---- warp reductions (xor butterflies: every lane ends with the same value) ------------------------------
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// The warp's first candidate in the selection order (a total order: every lane gets the same one).
__device__ __forceinline__ RouteCandidate warp_first(RouteCandidate c) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const RouteCandidate other{__shfl_xor_sync(kFullMask, c.key, offset), __shfl_xor_sync(kFullMask, c.id, offset),
                               __shfl_xor_sync(kFullMask, c.score, offset)};
    c = first_of(c, other);
  }
  return c;
}

// ---- moe_topk_route ---------------------------------------------------------------------------------------
// Shared memory of a warp for grouped routing, in floats: the row's E keys, the G group scores, then one kept
// flag (byte) per group.
__host__ __device__ __forceinline__ int group_shared_floats(int experts, int groups) {
  return experts + groups + (groups + 3) / 4;
}

// x[slot] = float32(logits[token, lane_expert(lane, slot)]) (exact conversion), -inf in unused slots.
template <int kDType, int kSlots>
__device__ __forceinline__ void load_row(const TopkRouteArgs& a, int64_t token, int lane, uint32_t unused,
                                         float (&x)[kSlots]) {
  const int64_t row = token * a.row_stride;
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    x[slot] = slot_used(unused, slot) ? load_as_float(a.logits, kDType, row + lane_expert(lane, slot)) : -INFINITY;
  }
}

template <int kSlots>
__device__ __forceinline__ void compute_scores(const float (&x)[kSlots], int scoring, uint32_t unused,
                                               float (&score)[kSlots]) {
  if (scoring == kMoeSoftmax) {
    const float row_max = warp_max(lane_logit_max(x, unused));
    const float row_sum = warp_sum(lane_softmax_numerators(x, row_max, unused, score));
    lane_softmax_scores(row_sum, score);
  } else {
    lane_sigmoid_scores(x, unused, score);
  }
}

// Grouped routing: the keys of experts outside the topk_groups best groups become -inf. shared: the warp's
// group_shared_floats() floats. Lane l scores groups l, l + 32, ... by a sequential scan of their keys, then
// counts the groups ahead of each of them (G is small in practice: 8 for DeepSeek-V3).
template <int kSlots>
__device__ void keep_top_groups(const TopkRouteArgs& a, float* shared, int lane, uint32_t unused,
                                float (&key)[kSlots]) {
  const int group_size = a.experts / a.num_groups;
  float* row_keys = shared;
  float* scores = shared + a.experts;
  uint8_t* kept = reinterpret_cast<uint8_t*>(scores + a.num_groups);
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    if (slot_used(unused, slot)) row_keys[lane_expert(lane, slot)] = key[slot];
  }
  __syncwarp();
  for (int g = lane; g < a.num_groups; g += kMoeLanes) {
    scores[g] = group_score(row_keys + g * group_size, group_size, a.bias != nullptr);
  }
  __syncwarp();
  for (int g = lane; g < a.num_groups; g += kMoeLanes) kept[g] = group_kept(scores, a.num_groups, g, a.topk_groups);
  __syncwarp();
  lane_mask_groups(kept, group_size, lane, unused, key);
}

// k argmax rounds; lane j keeps the j-th winner, then the weights (renormalized in winner order) and ids of
// the token are written by lanes 0 .. k-1.
template <int kSlots>
__device__ __forceinline__ void select_experts(const TopkRouteArgs& a, int64_t token, int lane, uint32_t unused,
                                               const float (&key)[kSlots], const float (&score)[kSlots]) {
  uint32_t taken = unused;
  RouteCandidate mine = no_candidate();
  for (int round = 0; round < a.k; ++round) {
    const RouteCandidate winner = warp_first(lane_best(key, score, taken, lane));
    taken = take_winner(taken, winner, lane);
    if (lane == round) mine = winner;
  }
  float total = 0.f;
  if (a.renormalize) {
    for (int j = 0; j < a.k; ++j) total += __shfl_sync(kFullMask, mine.score, j);
  }
  if (lane < a.k) {
    const int64_t at = token * a.k + lane;
    a.weights[at] = route_weight(mine.score, total, a.renormalize, a.scaling);
    a.ids[at] = mine.id;
  }
}

template <int kDType, int kSlots>
__global__ void __launch_bounds__(kRouteThreads) moe_topk_route_kernel(const __grid_constant__ TopkRouteArgs a) {
  extern __shared__ float group_shared[];
  const int warp = threadIdx.x / kMoeLanes, lane = threadIdx.x % kMoeLanes;
  const int64_t token = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (token >= a.tokens) return;  // the whole warp: the kernel has no CTA-wide barrier
  const uint32_t unused = unused_slots(lane, a.experts, kSlots);
  float x[kSlots], score[kSlots], key[kSlots];
  load_row<kDType, kSlots>(a, token, lane, unused, x);
  compute_scores(x, a.scoring, unused, score);
  lane_keys(x, score, a.bias, lane, unused, key);
  if (a.num_groups > 1) {
    keep_top_groups(a, group_shared + warp * group_shared_floats(a.experts, a.num_groups), lane, unused, key);
  }
  select_experts(a, token, lane, unused, key, score);
}

template <int kDType, int kSlots>
cudaError_t launch_route(const TopkRouteArgs& a, unsigned ctas, size_t shared_bytes, cudaStream_t stream) {
  moe_topk_route_kernel<kDType, kSlots><<<ctas, kRouteThreads, shared_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int kDType>
cudaError_t launch_route_for_slots(const TopkRouteArgs& a, unsigned ctas, size_t shared_bytes,
                                   cudaStream_t stream) {
  switch (route_slots(a.experts)) {
    case 1:
      return launch_route<kDType, 1>(a, ctas, shared_bytes, stream);
    case 2:
      return launch_route<kDType, 2>(a, ctas, shared_bytes, stream);
    case 4:
      return launch_route<kDType, 4>(a, ctas, shared_bytes, stream);
    case 8:
      return launch_route<kDType, 8>(a, ctas, shared_bytes, stream);
    case 16:
      return launch_route<kDType, 16>(a, ctas, shared_bytes, stream);
    default:
      return launch_route<kDType, kMoeMaxSlots>(a, ctas, shared_bytes, stream);
  }
}

bool valid_route_args(const TopkRouteArgs& a) {
  const bool sizes = a.tokens >= 0 && a.experts >= 1 && a.experts <= kMoeMaxExperts && a.k >= 1 &&
                     a.k <= kMoeMaxK && a.k <= a.experts && a.row_stride >= 0;
  const bool groups = a.num_groups <= 1 || (a.experts % a.num_groups == 0 && a.topk_groups >= 1 &&
                                            a.topk_groups <= a.num_groups);
  const bool codes = (a.scoring == kMoeSoftmax || a.scoring == kMoeSigmoid) &&
                     (a.dtype == kFloat32 || a.dtype == kBFloat16 || a.dtype == kFloat16);
  return sizes && a.num_groups >= 0 && groups && codes && a.weights != nullptr && a.ids != nullptr;
}

// ---- moe_align_block_size -----------------------------------------------------------------------------------
__global__ void __launch_bounds__(kFillThreads) fill_sentinel_kernel(int32_t* sorted_ids, int64_t capacity,
                                                                     int32_t sentinel) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < capacity; i += stride) {
    sorted_ids[i] = sentinel;
  }
}

// chunk_counts[c, e] = pairs of chunk c (blockIdx.x) with expert e. The histogram lives in shared memory when E
// ints fit, else directly in the chunk's row of chunk_counts (global atomics).
__global__ void __launch_bounds__(kCountThreads) count_chunks_kernel(const int32_t* ids, int64_t pairs,
                                                                     int64_t chunk_pairs, int experts,
                                                                     bool shared_histogram, int32_t* chunk_counts) {
  extern __shared__ int32_t shared_counts[];
  const int64_t begin = int64_t(blockIdx.x) * chunk_pairs;
  const int64_t end = begin + chunk_pairs < pairs ? begin + chunk_pairs : pairs;
  int32_t* row = chunk_counts + int64_t(blockIdx.x) * experts;
  int32_t* counts = shared_histogram ? shared_counts : row;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) atomicAdd(&counts[ids[p]], 1);
  __syncthreads();
  if (shared_histogram) {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) row[e] = counts[e];
  }
}

struct TileScan {
  int32_t exclusive;  // sum of the values of the lower threads of the CTA
  int32_t total;      // sum over the CTA
};

// Exclusive scan of one value per thread over the CTA (warp shuffles, then the warp totals in shared memory).
__device__ TileScan block_exclusive_scan(int32_t value, int32_t* warp_totals) {
  const int lane = threadIdx.x % kMoeLanes, warp = threadIdx.x / kMoeLanes;
  const int warps = blockDim.x / kMoeLanes;
  int32_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kMoeLanes; offset <<= 1) {
    const int32_t lower = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += lower;
  }
  if (lane == kMoeLanes - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t t = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kMoeLanes; offset <<= 1) {
      const int32_t lower = __shfl_up_sync(kFullMask, t, offset);
      if (lane >= offset) t += lower;
    }
    if (lane < warps) warp_totals[lane] = t;
  }
  __syncthreads();
  const TileScan r{(warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - value, warp_totals[warps - 1]};
  __syncthreads();  // warp_totals is reused by the next call
  return r;
}

// The single-block scan: chunk_counts columns -> chunk starts inside each expert; run_offsets[e] = start of e's
// padded run; block_expert_ids; *total.
__global__ void __launch_bounds__(kScanThreads) scan_runs_kernel(int32_t* chunk_counts, int64_t chunks, int experts,
                                                                 int block_size, const int32_t* expert_map,
                                                                 int64_t num_blocks, int32_t* run_offsets,
                                                                 int32_t* block_expert_ids, int32_t* total) {
  __shared__ int32_t warp_totals[kScanThreads / kMoeLanes];
  __shared__ int32_t runs_total;
  // Thread i handles experts i, i + blockDim.x, ... in both loops, so it reads back only its own counts.
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    run_offsets[e] = scan_chunk_column(chunk_counts, chunks, experts, e);
  }
  int32_t base = 0;
  for (int tile = 0; tile < experts; tile += blockDim.x) {
    const int e = tile + threadIdx.x;
    const int32_t run =
        e < experts ? static_cast<int32_t>(expert_run(run_offsets[e], local_expert(e, expert_map), block_size)) : 0;
    const TileScan scan = block_exclusive_scan(run, warp_totals);
    if (e < experts) run_offsets[e] = base + scan.exclusive;
    base += scan.total;
  }
  if (threadIdx.x == 0) runs_total = base;
  __syncthreads();  // every run offset is written
  for (int64_t b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    block_expert_ids[b] = block_expert_id(run_offsets, experts, runs_total, b, block_size, expert_map);
  }
  if (threadIdx.x == 0) *total = runs_total;
}

// One warp per chunk: its pairs in ascending p, 32 a step; position[e] (the chunk's row of chunk_starts) is
// where the chunk's next pair of expert e goes inside e's run.
__global__ void __launch_bounds__(kScatterThreads) scatter_pairs_kernel(const int32_t* ids, int64_t pairs,
                                                                        int64_t chunk_pairs, int64_t chunks,
                                                                        int experts, const int32_t* expert_map,
                                                                        const int32_t* run_offsets,
                                                                        int32_t* chunk_starts, int32_t* sorted_ids) {
  const int lane = threadIdx.x % kMoeLanes;
  const int64_t chunk = int64_t(blockIdx.x) * kScatterWarps + threadIdx.x / kMoeLanes;
  if (chunk >= chunks) return;  // the whole warp
  const int64_t begin = chunk * chunk_pairs;
  const int64_t end = begin + chunk_pairs < pairs ? begin + chunk_pairs : pairs;
  int32_t* position = chunk_starts + chunk * experts;
  for (int64_t step = begin; step < end; step += kMoeLanes) {
    const int64_t p = step + lane;
    const int32_t e = p < end ? ids[p] : -1;  // lanes past the chunk form their own group, and write nothing
    const uint32_t same = __match_any_sync(kFullMask, e);
    if (e >= 0 && local_expert(e, expert_map) >= 0) {
      sorted_ids[run_offsets[e] + position[e] + rank_in_step(same, lane)] = static_cast<int32_t>(p);
    }
    __syncwarp();  // every lane has read position[e] before its leader advances it
    if (e >= 0 && lane == step_leader(same)) position[e] += popcount32(same);
    __syncwarp();
  }
}

struct AlignLayout {
  size_t chunk_counts;  // byte offsets in the workspace
  size_t run_offsets;
  size_t bytes;  // the whole workspace
};

AlignLayout align_layout(int64_t pairs, int experts) {
  const AlignChunks chunks = align_chunks(pairs, experts);
  AlignLayout l;
  l.chunk_counts = 0;
  l.run_offsets = align_up(sizeof(int32_t) * static_cast<size_t>(chunks.count) * experts);
  l.bytes = l.run_offsets + align_up(sizeof(int32_t) * static_cast<size_t>(experts));
  return l;
}

bool valid_align_args(const AlignArgs& a) {
  if (a.pairs < 0 || a.pairs > INT32_MAX || a.experts < 1 || a.block_size < 1) return false;
  if (align_capacity(a.pairs, a.experts, a.block_size) > INT32_MAX) return false;
  if (a.sorted_ids == nullptr || a.block_expert_ids == nullptr || a.total == nullptr) return false;
  return a.workspace != nullptr && a.workspace_bytes >= align_layout(a.pairs, a.experts).bytes;
}

unsigned fill_ctas(int64_t capacity) {
  const int64_t ctas = ceil_div64(capacity, kFillThreads);
  return static_cast<unsigned>(ctas < 4096 ? ctas : 4096);
}

}  // namespace

cudaError_t launch_moe_topk_route(const TopkRouteArgs& a, cudaStream_t stream) {
  if (!valid_route_args(a)) return cudaErrorInvalidValue;
  if (a.tokens == 0) return cudaSuccess;
  const int64_t ctas = ceil_div64(a.tokens, kRouteWarps);
  if (ctas > INT32_MAX) return cudaErrorInvalidValue;  // grid.x limit
  const size_t shared_bytes =
      a.num_groups > 1 ? sizeof(float) * kRouteWarps * group_shared_floats(a.experts, a.num_groups) : 0;
  const unsigned grid = static_cast<unsigned>(ctas);
  switch (a.dtype) {
    case kBFloat16:
      return launch_route_for_slots<kBFloat16>(a, grid, shared_bytes, stream);
    case kFloat16:
      return launch_route_for_slots<kFloat16>(a, grid, shared_bytes, stream);
    default:
      return launch_route_for_slots<kFloat32>(a, grid, shared_bytes, stream);
  }
}

size_t moe_align_workspace_bytes(int64_t pairs, int experts) {
  return pairs < 0 || experts < 1 ? 0 : align_layout(pairs, experts).bytes;
}

cudaError_t launch_moe_align_block_size(const AlignArgs& a, cudaStream_t stream) {
  if (!valid_align_args(a)) return cudaErrorInvalidValue;
  const AlignChunks chunks = align_chunks(a.pairs, a.experts);
  const AlignLayout layout = align_layout(a.pairs, a.experts);
  char* workspace = static_cast<char*>(a.workspace);
  int32_t* chunk_counts = reinterpret_cast<int32_t*>(workspace + layout.chunk_counts);
  int32_t* run_offsets = reinterpret_cast<int32_t*>(workspace + layout.run_offsets);
  const int64_t capacity = align_capacity(a.pairs, a.experts, a.block_size);
  const int32_t sentinel = static_cast<int32_t>(a.pairs);

  if (capacity > 0) {
    fill_sentinel_kernel<<<fill_ctas(capacity), kFillThreads, 0, stream>>>(a.sorted_ids, capacity, sentinel);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (chunks.count > 0) {
    const size_t histogram_bytes = sizeof(int32_t) * static_cast<size_t>(a.experts);
    const bool shared_histogram = histogram_bytes <= kDefaultSharedBytes;
    count_chunks_kernel<<<static_cast<unsigned>(chunks.count), kCountThreads, shared_histogram ? histogram_bytes : 0,
                          stream>>>(a.ids, a.pairs, chunks.pairs, a.experts, shared_histogram, chunk_counts);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  scan_runs_kernel<<<1, kScanThreads, 0, stream>>>(chunk_counts, chunks.count, a.experts, a.block_size,
                                                   a.expert_map, capacity / a.block_size, run_offsets,
                                                   a.block_expert_ids, a.total);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || chunks.count == 0) return err;
  const unsigned scatter_ctas = static_cast<unsigned>(ceil_div64(chunks.count, kScatterWarps));
  scatter_pairs_kernel<<<scatter_ctas, kScatterThreads, 0, stream>>>(a.ids, a.pairs, chunks.pairs, chunks.count,
                                                                     a.experts, a.expert_map, run_offsets,
                                                                     chunk_counts, a.sorted_ids);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pykernels
