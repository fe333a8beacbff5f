// CPU kernels of the element-wise statistics across N tensors (CONTRACT: trimmed_mean, sign_count; reference:
// pykernels/reference/statistics.py).
//
// trimmed_mean streams the flat index range in tiles. A tile holds, for each of the N models, the int32
// totalOrder keys of its task-vector values (key order = numerical order with -0 < +0, an involution of the
// float bits), one row of L elements per model. A sorting network (Batcher's odd-even merge sort) runs over the
// N rows: each comparator is an element-wise min/max of two rows, a loop that vectorises (vpminsd/vpmaxsd), so
// every element of the tile is sorted at once. Comparators that cannot reach the kept ranks [trim, N - trim)
// are dropped, and those of which only one output reaches them keep only that output (a selection network).
// The kept rows are then summed in ascending order and divided, exactly as the reference does per element:
// the sorted sequence of bit patterns is unique in totalOrder, so the result is bit-identical to it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {
namespace {

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// totalOrder key of a float32 and back (the same map).
inline int32_t order_key(uint32_t bits) {
  const int32_t s = static_cast<int32_t>(bits);
  return s ^ ((s >> 31) & 0x7FFFFFFF);
}

inline float key_value(int32_t key) { return bits_float(static_cast<uint32_t>(key ^ ((key >> 31) & 0x7FFFFFFF))); }

constexpr int32_t kPlusInfKey = 0x7F800000;
constexpr int32_t kMinusInfKey = static_cast<int32_t>(0x807FFFFFu);
constexpr uint32_t kQuietNan = 0x7FC00000u;

// ------------------------------------------------------------------------------------------------------------
// The selection network of one (N, trim).

struct Comparator {
  int lo, hi;  // wires, lo < hi: lo receives the minimum, hi the maximum
  bool need_min, need_max;
};

// Batcher's odd-even merge sort of P = 2^ceil(log2 n) wires, without the comparators that touch a wire >= n:
// padding wires holding +inf never move, so those comparators are no-ops.
std::vector<Comparator> sorting_network(int n) {
  int p2 = 1;
  while (p2 < n) p2 <<= 1;
  std::vector<Comparator> net;
  for (int p = 1; p < p2; p <<= 1) {
    for (int k = p; k >= 1; k >>= 1) {
      for (int j = k % p; j + k < p2; j += 2 * k) {
        for (int i = 0; i < std::min(k, p2 - j - k); ++i) {
          const int a = i + j, b = i + j + k;
          if (a / (2 * p) == b / (2 * p) && b < n) net.push_back({a, b, true, true});
        }
      }
    }
  }
  return net;
}

// Keeps only what reaches the wires [first, last) at the end: walking backwards from them, a comparator is
// needed when one of its outputs is, and then both of its inputs are.
std::vector<Comparator> selection_network(int n, int first, int last) {
  std::vector<Comparator> net = sorting_network(n);
  std::vector<bool> needed(n, false);
  for (int w = first; w < last; ++w) needed[w] = true;
  std::vector<Comparator> kept;
  for (auto c = net.rbegin(); c != net.rend(); ++c) {
    Comparator cmp = *c;
    cmp.need_min = needed[cmp.lo];
    cmp.need_max = needed[cmp.hi];
    if (!cmp.need_min && !cmp.need_max) continue;
    needed[cmp.lo] = needed[cmp.hi] = true;
    kept.push_back(cmp);
  }
  std::reverse(kept.begin(), kept.end());
  return kept;
}

// ------------------------------------------------------------------------------------------------------------
// trimmed_mean passes over one tile of `len` elements.

// key[i] = order_key(x[i] - b[i]) (x[i] without a base); returns the largest |bits| (> 0x7F800000 iff a NaN).
template <bool kBase>
uint32_t keys_pass(const float* __restrict x, const float* __restrict b, int32_t len, int32_t* __restrict key) {
  uint32_t largest = 0;
  for (int32_t i = 0; i < len; ++i) {
    const uint32_t u = float_bits(kBase ? x[i] - b[i] : x[i]);
    largest = std::max(largest, u & 0x7FFFFFFFu);
    key[i] = order_key(u);
  }
  return largest;
}

void nan_flags_pass(const int32_t* __restrict key, int32_t len, uint8_t* __restrict nan) {
  for (int32_t i = 0; i < len; ++i) nan[i] |= (key[i] > kPlusInfKey) | (key[i] < kMinusInfKey);
}

void compare_exchange(int32_t* __restrict lo, int32_t* __restrict hi, int32_t len, bool need_min, bool need_max) {
  if (need_min && need_max) {
    for (int32_t i = 0; i < len; ++i) {
      const int32_t a = lo[i], b = hi[i];
      lo[i] = std::min(a, b);
      hi[i] = std::max(a, b);
    }
  } else if (need_min) {
    for (int32_t i = 0; i < len; ++i) lo[i] = std::min(lo[i], hi[i]);
  } else {
    for (int32_t i = 0; i < len; ++i) hi[i] = std::max(lo[i], hi[i]);
  }
}

void first_value_pass(const int32_t* __restrict key, int32_t len, float* __restrict acc) {
  for (int32_t i = 0; i < len; ++i) acc[i] = key_value(key[i]);
}

void add_value_pass(const int32_t* __restrict key, int32_t len, float* __restrict acc) {
  for (int32_t i = 0; i < len; ++i) acc[i] += key_value(key[i]);
}

// out = acc / divisor, every NaN made the canonical quiet NaN.
void divide_pass(float* __restrict acc, float divisor, int32_t len) {
  const float nan = bits_float(kQuietNan);
  for (int32_t i = 0; i < len; ++i) {
    const float r = acc[i] / divisor;
    acc[i] = r != r ? nan : r;
  }
}

void poison_pass(const uint8_t* __restrict nan_flags, int32_t len, float* __restrict out) {
  const float nan = bits_float(kQuietNan);
  for (int32_t i = 0; i < len; ++i) out[i] = nan_flags[i] ? nan : out[i];
}

struct TrimPlan {
  const DeltaInputs* in;
  int n, trim;
  float divisor;
  std::vector<Comparator> net;
  int64_t tile;        // elements per tile (a multiple of 16, <= kChunk)
  int64_t row_stride;  // int32 entries between the rows of the key tile
};

// Tiles small enough that the N key rows stay in L1/L2 while the network runs over them.
int64_t tile_for(int n) {
  constexpr int64_t kTileBytes = 32 * 1024;
  const int64_t t = (kTileBytes / 4 / n) / 64 * 64;
  return std::min<int64_t>(kChunk, std::max<int64_t>(64, t));
}

void trimmed_mean_tile(const TrimPlan& plan, int64_t start, int32_t len, ChunkBuffers& buf, int32_t* keys,
                       uint8_t* nan_flags, float* out) {
  const DeltaInputs& in = *plan.in;
  const float* b = in.load_base(start, len, buf[0]);
  uint32_t largest = 0;
  for (int m = 0; m < plan.n; ++m) {
    const float* x = in.models[m].load(start, len, buf[1]);
    int32_t* row = keys + m * plan.row_stride;
    const uint32_t l = b != nullptr ? keys_pass<true>(x, b, len, row) : keys_pass<false>(x, nullptr, len, row);
    largest = std::max(largest, l);
  }
  const bool has_nan = largest > 0x7F800000u;
  if (has_nan) {  // rare: flag the elements with a NaN value before the network reorders the rows
    std::memset(nan_flags, 0, len);
    for (int m = 0; m < plan.n; ++m) nan_flags_pass(keys + m * plan.row_stride, len, nan_flags);
  }
  for (const Comparator& c : plan.net) {
    compare_exchange(keys + c.lo * plan.row_stride, keys + c.hi * plan.row_stride, len, c.need_min, c.need_max);
  }
  first_value_pass(keys + plan.trim * plan.row_stride, len, out);
  for (int w = plan.trim + 1; w < plan.n - plan.trim; ++w) add_value_pass(keys + w * plan.row_stride, len, out);
  divide_pass(out, plan.divisor, len);
  if (has_nan) poison_pass(nan_flags, len, out);
}

at::Tensor trimmed_mean(const c10::optional<at::Tensor>& base, at::TensorList tensors, int64_t trim,
                        at::ScalarType out_dtype) {
  const char* op = "pykernels::trimmed_mean";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const int n = in.n();
  TORCH_CHECK(trim >= 0 && 2 * trim < n, op, ": trim must satisfy 0 <= 2 * trim < N = ", n, " (got ", trim, ")");
  TrimPlan plan{&in, n, static_cast<int>(trim), static_cast<float>(n - 2 * trim),
                selection_network(n, static_cast<int>(trim), n - static_cast<int>(trim)), tile_for(n), 0};
  plan.row_stride = plan.tile + 16;  // rows 64 bytes apart modulo 4 KiB (no 4K aliasing between rows)

  const bool direct = is_supported_float(out_dtype);
  at::Tensor out = at::empty(tensors[0].sizes(), tensors[0].options().dtype(direct ? out_dtype : at::kFloat));
  const Sink sink(out);
  float* out_fp32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    ChunkBuffers buf(3);  // base, model, output values
    ThreadScratch keys(kCountSlot, static_cast<size_t>(n) * plan.row_stride * sizeof(int32_t));
    std::vector<uint8_t> nan_flags(plan.tile);
    for (int64_t block = first; block < end; ++block) {
      for_chunks_of_block(in.numel, block, [&](int64_t chunk_start, int64_t chunk_len) {
        for (int64_t s = 0; s < chunk_len; s += plan.tile) {
          const int64_t start = chunk_start + s;
          const int32_t len = static_cast<int32_t>(std::min(plan.tile, chunk_len - s));
          float* values = out_fp32 != nullptr ? out_fp32 + start : buf[2];
          trimmed_mean_tile(plan, start, len, buf, keys.as<int32_t>(), nan_flags.data(), values);
          if (out_fp32 == nullptr) sink.store(start, len, values);
        }
      });
    }
  });
  return direct ? out : out.to(out_dtype);
}

// ------------------------------------------------------------------------------------------------------------
// sign_count

template <bool kBase>
void sign_pass(const float* __restrict x, const float* __restrict b, int32_t len, int8_t* __restrict count) {
  for (int32_t i = 0; i < len; ++i) {
    const float v = kBase ? x[i] - b[i] : x[i];
    count[i] = static_cast<int8_t>(count[i] + (v > 0.f) - (v < 0.f));  // NaN compares false: 0
  }
}

at::Tensor sign_count(const c10::optional<at::Tensor>& base, at::TensorList tensors) {
  const char* op = "pykernels::sign_count";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  at::Tensor out = at::empty(tensors[0].sizes(), tensors[0].options().dtype(at::kChar));
  int8_t* counts = out.data_ptr<int8_t>();
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    ChunkBuffers buf(2);  // base, model
    for (int64_t block = first; block < end; ++block) {
      for_chunks_of_block(in.numel, block, [&](int64_t start, int64_t len) {
        const int32_t len32 = static_cast<int32_t>(len);
        int8_t* count = counts + start;
        std::memset(count, 0, len);
        const float* b = in.load_base(start, len, buf[0]);
        for (int m = 0; m < in.n(); ++m) {
          const float* x = in.models[m].load(start, len, buf[1]);
          if (b != nullptr) {
            sign_pass<true>(x, b, len32, count);
          } else {
            sign_pass<false>(x, nullptr, len32, count);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("trimmed_mean", &trimmed_mean);
  m.impl("sign_count", &sign_count);
}

}  // namespace cpu
}  // namespace pykernels
