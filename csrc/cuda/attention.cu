// PBS-Attn forward kernel: causal attention of each query block over the key blocks listed for it, keys and
// values read through the permutation (contract: docs/PRIMITIVES.md "Attention", op pbs_block_attention).
// Plain CUDA, no torch headers (csrc/cuda/bindings.cpp is the torch glue).
//
// Layout: one CTA of kAttnWarps warps per (query block, batch * Hq + head). The CTA takes its query block in
// passes of attn_rows_per_pass() rows (all of it for the common sizes); a pass loads its query rows once into
// shared memory and walks only the listed key blocks, in tiles of kAttnTileCols keys: the tile's tokens
// perm[c], then its K and V rows (k + token * stride, no permuted copies) go to shared memory as float32.
// Each warp holds attn_rows_per_warp() query rows: lane c computes the logit of key c of the tile, the warp
// reduces max and sum with shuffles, and lane t accumulates elements t, t + 32, ... of each row's output in
// registers. The online-softmax arithmetic and the tile geometry are the PK_HD helpers of
// common/online_softmax.h, which tests/test_cuda_attention_host.py runs on the host in this order.
// Plain fp32 FMA throughout (no tensor cores): correctness and clarity over peak speed.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/fused_element.h"
#include "common/online_softmax.h"
#include "cuda/attention.h"

namespace pykernels {
namespace gpu {
namespace {

constexpr int kThreads = kAttnWarps * 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in to more shared memory

// ---- elements: storage type, exact load to float32, round-to-nearest-even store (common/fused_element.h) ---
template <int kDType>
struct Element;

template <>
struct Element<kFloat32> {
  using Storage = float;
  static __device__ __forceinline__ float load(Storage x) { return x; }
  static __device__ __forceinline__ Storage store(float x) { return x; }
};

template <>
struct Element<kBFloat16> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float load(Storage x) { return bf16_bits_to_float(x); }
  static __device__ __forceinline__ Storage store(float x) { return float_to_bf16_bits(x); }
};

template <>
struct Element<kFloat16> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float load(Storage x) { return half_bits_to_float(x); }
  static __device__ __forceinline__ Storage store(float x) { return float_to_half_bits(x); }
};

// ---- shared-memory tiles of one padded head dim kD ---------------------------------------------------------
template <int kD>
struct Tiles {
  static constexpr int kRowsPerWarp = attn_rows_per_warp(kD);
  static constexpr int kRows = attn_rows_per_pass(kD);
  static constexpr int kPerLane = kD / 32;    // output elements of a row held by one lane
  static constexpr int kKeyStride = kD + 1;   // lane c reads key row c: the odd stride avoids bank conflicts
  static constexpr size_t kQueryFloats = size_t(kRows) * kD;
  static constexpr size_t kKeyFloats = size_t(kAttnTileCols) * kKeyStride;
  static constexpr size_t kValueFloats = size_t(kAttnTileCols) * kD;
  static constexpr size_t kSharedBytes =
      sizeof(float) * (kQueryFloats + kKeyFloats + kValueFloats) + sizeof(int32_t) * kAttnTileCols;
  // CTAs per SM the register budget is sized for: as many as the shared memory of an A100 (164 KiB) holds
  // (24, 48 and 80 KiB a CTA), at most 4 (128 registers a thread).
  static constexpr int kMinBlocksPerSM = kD >= 256 ? 2 : kD >= 128 ? 3 : 4;

  float* query;    // [kRows][kD]: the pass's query rows, zero past the block / past d
  float* key;      // [kAttnTileCols][kKeyStride]
  float* value;    // [kAttnTileCols][kD]: zero for keys no row of the pass sees and past d
  int32_t* token;  // [kAttnTileCols]: original token of each column, kNoToken past the key block

  __device__ explicit Tiles(float* shared)
      : query(shared),
        key(shared + kQueryFloats),
        value(shared + kQueryFloats + kKeyFloats),
        token(reinterpret_cast<int32_t*>(shared + kQueryFloats + kKeyFloats + kValueFloats)) {}
};

// The (N, D) slices of one (batch, query head) and of its kv head.
template <typename Storage>
struct HeadInputs {
  const Storage* q;
  const Storage* k;
  const Storage* v;
  int64_t q_token_stride;
  int64_t k_token_stride;
  int64_t v_token_stride;
  const int32_t* perm;  // perm[b, hkv, :]
};

// ---- warp reductions (xor butterflies: every lane ends with the same, bit-identical value) -----------------
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

__device__ __forceinline__ int32_t warp_min(int32_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// ---- loads -------------------------------------------------------------------------------------------------
// Query rows [row_begin, row_begin + rows) of the head into tiles.query (consecutive threads read consecutive
// elements of a row: coalesced).
template <int kDType, int kD>
__device__ void load_query_rows(const Tiles<kD>& tiles, const HeadInputs<typename Element<kDType>::Storage>& in,
                                int64_t row_begin, int64_t rows, int d) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < Tiles<kD>::kRows * kD; idx += kThreads) {
    const int r = idx / kD, e = idx % kD;
    float x = 0.f;
    if (r < rows && e < d) x = Element<kDType>::load(in.q[(row_begin + r) * in.q_token_stride + e]);
    tiles.query[idx] = x;
  }
}

// K and V rows of the tile's tokens. Keys that no row of the pass sees (token > last_row, or past the block)
// are not read: their logits are -inf, and their zero V rows keep p * v = 0 exact.
template <int kDType, int kD>
__device__ void load_key_value_rows(const Tiles<kD>& tiles, const HeadInputs<typename Element<kDType>::Storage>& in,
                                    int64_t last_row, int d) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < kAttnTileCols * kD; idx += kThreads) {
    const int c = idx / kD, e = idx % kD;
    const int32_t token = tiles.token[c];
    float kx = 0.f, vx = 0.f;
    if (e < d && key_visible(last_row, token)) {
      kx = Element<kDType>::load(in.k[int64_t(token) * in.k_token_stride + e]);
      vx = Element<kDType>::load(in.v[int64_t(token) * in.v_token_stride + e]);
    }
    tiles.key[c * Tiles<kD>::kKeyStride + e] = kx;
    tiles.value[c * kD + e] = vx;
  }
}

// ---- one tile of keys for the warp's query rows --------------------------------------------------------------
// Warp w holds the pass's local rows w, w + kAttnWarps, ... (interleaved, so a short block or the causal
// staircase spreads its work over all warps).
__device__ __forceinline__ int local_row(int slot, int warp) { return slot * kAttnWarps + warp; }

template <int kD>
__device__ __forceinline__ void attend_tile(SoftmaxRow (&state)[Tiles<kD>::kRowsPerWarp],
                                            float (&acc)[Tiles<kD>::kRowsPerWarp][Tiles<kD>::kPerLane],
                                            const Tiles<kD>& tiles, int cols, int64_t row_begin, int64_t row_end,
                                            int d, float scale) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t token = tiles.token[lane];
  const float* key = tiles.key + lane * Tiles<kD>::kKeyStride;
#pragma unroll
  for (int slot = 0; slot < Tiles<kD>::kRowsPerWarp; ++slot) {
    const int local = local_row(slot, warp);
    const int64_t row = row_begin + local;
    if (row >= row_end) break;  // warp-uniform: later slots are further past the end
    const float logit = masked_logit(key_visible(row, token), tiles.query + local * kD, key, d, scale);
    const float tile_max = warp_max(logit);
    if (tile_max == -INFINITY) continue;  // the row sees no key of the tile: state and accumulator unchanged
    const SoftmaxStep step = softmax_step(state[slot], tile_max);
    const float p = softmax_weight(logit, step);
    state[slot] = softmax_advance(state[slot], step, warp_sum(p));
#pragma unroll
    for (int e = 0; e < Tiles<kD>::kPerLane; ++e) acc[slot][e] = rescale_accumulator(acc[slot][e], step);
    for (int c = 0; c < cols; ++c) {
      const float pc = __shfl_sync(kFullMask, p, c);
      const float* value = tiles.value + c * kD + lane;
#pragma unroll
      for (int e = 0; e < Tiles<kD>::kPerLane; ++e) acc[slot][e] = accumulate_value(acc[slot][e], pc, value[32 * e]);
    }
  }
}

// out[row] = acc / l in the output dtype, lse[row] = m + log(l) (0 and -inf for a row that saw no key).
template <int kDType, int kD>
__device__ __forceinline__ void write_rows(const SoftmaxRow (&state)[Tiles<kD>::kRowsPerWarp],
                                           const float (&acc)[Tiles<kD>::kRowsPerWarp][Tiles<kD>::kPerLane],
                                           int64_t row_begin, int64_t row_end, int d,
                                           typename Element<kDType>::Storage* out, float* lse) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int slot = 0; slot < Tiles<kD>::kRowsPerWarp; ++slot) {
    const int64_t row = row_begin + local_row(slot, warp);
    if (row >= row_end) break;
#pragma unroll
    for (int e = 0; e < Tiles<kD>::kPerLane; ++e) {
      const int col = lane + 32 * e;
      if (col < d) out[row * d + col] = Element<kDType>::store(softmax_output(acc[slot][e], state[slot]));
    }
    if (lane == 0) lse[row] = softmax_lse(state[slot]);
  }
}

// Query rows [row_begin, row_end) of the CTA's block over the listed key blocks indices[list_begin, list_end).
template <int kDType, int kD>
__device__ void attend_pass(const BlockAttentionArgs& a, const Tiles<kD>& tiles,
                            const HeadInputs<typename Element<kDType>::Storage>& in, int64_t list_begin,
                            int64_t list_end, int64_t row_begin, int64_t row_end,
                            typename Element<kDType>::Storage* out, float* lse) {
  constexpr int kSlots = Tiles<kD>::kRowsPerWarp;
  __syncthreads();  // the previous pass is done reading tiles.query
  load_query_rows<kDType, kD>(tiles, in, row_begin, row_end - row_begin, a.d);
  SoftmaxRow state[kSlots];
  float acc[kSlots][Tiles<kD>::kPerLane];
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    state[slot] = softmax_row_start();
#pragma unroll
    for (int e = 0; e < Tiles<kD>::kPerLane; ++e) acc[slot][e] = 0.f;
  }
  const int64_t last_row = row_end - 1;
  for (int64_t listed = list_begin; listed < list_end; ++listed) {
    const PositionRange keys = block_positions(a.indices[listed], a.block_size, a.n);
    for (int64_t tile_begin = keys.begin; tile_begin < keys.end; tile_begin += kAttnTileCols) {
      const int cols = tile_columns(tile_begin, keys.end);
      __syncthreads();  // every warp is done with the previous tile (and the query rows are stored)
      if (threadIdx.x < kAttnTileCols) {
        tiles.token[threadIdx.x] = static_cast<int>(threadIdx.x) < cols ? in.perm[tile_begin + threadIdx.x] : kNoToken;
      }
      __syncthreads();
      // Skip a tile whose keys all come after the pass's last row (same decision in every warp: no
      // __syncthreads is skipped by some threads only).
      if (!key_visible(last_row, warp_min(tiles.token[threadIdx.x % 32]))) continue;
      load_key_value_rows<kDType, kD>(tiles, in, last_row, a.d);
      __syncthreads();
      attend_tile<kD>(state, acc, tiles, cols, row_begin, row_end, a.d, a.scale);
    }
  }
  write_rows<kDType, kD>(state, acc, row_begin, row_end, a.d, out, lse);
}

template <int kDType, int kD>
__global__ void __launch_bounds__(kThreads, Tiles<kD>::kMinBlocksPerSM)
    pbs_block_attention_kernel(const __grid_constant__ BlockAttentionArgs a) {
  using Storage = typename Element<kDType>::Storage;
  extern __shared__ float shared[];
  const Tiles<kD> tiles(shared);

  const int64_t nb = (a.n + a.block_size - 1) / a.block_size;
  const CtaWork work = cta_work(blockIdx.x, nb);
  const int64_t head_row = work.head_row, block = work.block;  // head_row = b * Hq + h
  const int64_t plan_row = head_row * nb + block;
  const int64_t b = head_row / a.heads_q, h = head_row % a.heads_q;
  const int64_t hkv = h / (a.heads_q / a.heads_kv);

  HeadInputs<Storage> in;
  in.q = static_cast<const Storage*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1];
  in.k = static_cast<const Storage*>(a.k) + b * a.k_strides[0] + hkv * a.k_strides[1];
  in.v = static_cast<const Storage*>(a.v) + b * a.v_strides[0] + hkv * a.v_strides[1];
  in.q_token_stride = a.q_strides[2];
  in.k_token_stride = a.k_strides[2];
  in.v_token_stride = a.v_strides[2];
  in.perm = a.perm + (b * a.heads_kv + hkv) * a.n;
  Storage* out = static_cast<Storage*>(a.out) + head_row * a.n * a.d;
  float* lse = a.lse + head_row * a.n;

  const int64_t list_begin = a.offsets[plan_row], list_end = a.offsets[plan_row + 1];
  const PositionRange rows = block_positions(block, a.block_size, a.n);
  for (int64_t row_begin = rows.begin; row_begin < rows.end; row_begin += Tiles<kD>::kRows) {
    const int64_t row_end = row_begin + Tiles<kD>::kRows < rows.end ? row_begin + Tiles<kD>::kRows : rows.end;
    attend_pass<kDType, kD>(a, tiles, in, list_begin, list_end, row_begin, row_end, out, lse);
  }
}

// ---- launch ----------------------------------------------------------------------------------------------------
template <int kDType, int kD>
cudaError_t launch_kernel(const BlockAttentionArgs& a, unsigned ctas, cudaStream_t stream) {
  const auto kernel = pbs_block_attention_kernel<kDType, kD>;
  constexpr size_t bytes = Tiles<kD>::kSharedBytes;
  if (bytes > kDefaultSharedBytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<ctas, kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int kDType>
cudaError_t launch_for_dtype(const BlockAttentionArgs& a, unsigned ctas, cudaStream_t stream) {
  switch (padded_head_dim(a.d)) {
    case 64:
      return launch_kernel<kDType, 64>(a, ctas, stream);
    case 128:
      return launch_kernel<kDType, 128>(a, ctas, stream);
    default:
      return launch_kernel<kDType, 256>(a, ctas, stream);
  }
}

bool valid_args(const BlockAttentionArgs& a) {
  const bool sizes = a.batch >= 0 && a.heads_kv >= 1 && a.heads_q >= a.heads_kv && a.heads_q % a.heads_kv == 0 &&
                     a.n >= 0 && a.n <= INT32_MAX && a.d >= 1 && a.d <= 256 && a.block_size >= 1;
  const bool dtype = a.dtype == kFloat32 || a.dtype == kBFloat16 || a.dtype == kFloat16;
  return sizes && dtype;
}

}  // namespace

cudaError_t launch_pbs_block_attention(const BlockAttentionArgs& a, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  const int64_t nb = (a.n + a.block_size - 1) / a.block_size;
  const int64_t ctas = int64_t(a.batch) * a.heads_q * nb;
  if (ctas == 0) return cudaSuccess;
  if (ctas > INT32_MAX) return cudaErrorInvalidValue;  // grid.x limit
  const unsigned grid = static_cast<unsigned>(ctas);
  switch (a.dtype) {
    case kBFloat16:
      return launch_for_dtype<kBFloat16>(a, grid, stream);
    case kFloat16:
      return launch_for_dtype<kFloat16>(a, grid, stream);
    default:
      return launch_for_dtype<kFloat32>(a, grid, stream);
  }
}

}  // namespace gpu
}  // namespace pykernels
