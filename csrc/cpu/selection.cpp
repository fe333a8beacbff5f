// CPU order statistics on order-preserving uint32 keys (docs/PRIMITIVES.md; reference:
// pykernels/reference/selection.py): key_histogram, key_mask, key_find over the flat tensor, and row_select,
// row_topk_mask, row_rank over the rows of a 2-D tensor.
//
// Flat ops stream the tensor in the fixed blocks of chunk_io.h (parallel_blocks: contiguous ascending block
// ranges per call, fewer than 2^31 elements per call, so uint32 counters cannot overflow). Every result is an
// exact integer (counts, indices, masks), so it is identical for any thread count; anything that depends on
// index order (ties) is resolved from per-block counts and an exclusive prefix over blocks, never from the
// order in which threads finish.
//
// Row ops process rows in parallel (at::parallel_for over rows), computing each row's keys into buffers owned
// by the calling thread. Descending stable order is the order of the unique uint64 composites
// (key << 32) | (0xFFFFFFFF - index), so std::nth_element on them is exact; row_rank is the stable LSD radix
// sort of row_sort.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "cpu/chunk_io.h"
#include "cpu/row_sort.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr uint32_t kOrderNanKey = 0xFFFFFFFFu;  // every NaN, both modes
constexpr uint32_t kZeroKey = 0x80000000u;      // +0 and -0 in signed mode
constexpr int64_t kKeyBuckets = int64_t(1) << 16;
constexpr int64_t kKeyLimit = int64_t(1) << 32;  // key_mask: 2^32 selects nothing above

// ------------------------------------------------------------------------------------------------------------
// Keys

// Order key of one float32 value (CONTRACT: order_key). Integer operations only: no float comparison, so the
// result does not depend on denormals-are-zero modes.
template <bool kMag>
inline uint32_t order_key(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t key;
  if (kMag) {
    key = a;
  } else {
    // negative: ~u; positive: u | 0x80000000; either zero: 0x80000000
    key = a == 0 ? kZeroKey : u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  }
  return a > 0x7F800000u ? kOrderNanKey : key;
}

#if defined(PK_AVX512)
template <bool kMag>
inline __m512i order_keys16(const float* x) {
  const __m512i u = _mm512_loadu_si512(x);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  __m512i key;
  if (kMag) {
    key = a;
  } else {
    const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(static_cast<int>(kZeroKey)));
    key = _mm512_xor_si512(u, flip);
    key = _mm512_mask_mov_epi32(key, _mm512_cmpeq_epi32_mask(a, _mm512_setzero_si512()),
                                _mm512_set1_epi32(static_cast<int>(kZeroKey)));
  }
  return _mm512_mask_mov_epi32(key, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)),
                               _mm512_set1_epi32(-1));
}
#endif

// keys[i] = order_key(x[i]), i < n.
template <bool kMag>
void compute_keys(const float* __restrict x, int64_t n, uint32_t* __restrict keys) {
  int64_t i = 0;
#if defined(PK_AVX512)
  for (; i + 16 <= n; i += 16) _mm512_storeu_si512(keys + i, order_keys16<kMag>(x + i));
#endif
  for (; i < n; ++i) keys[i] = order_key<kMag>(x[i]);
}

// ------------------------------------------------------------------------------------------------------------
// Arguments

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

at::Tensor checked_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x is on ", x.device(), ", expected cpu");
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x has dtype ", x.scalar_type(),
              ", expected float32, bfloat16 or float16");
  return x.contiguous();
}

at::Tensor checked_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, n), got ", x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(x.size(1) < kKeyLimit, op, ": rows must hold fewer than 2^32 elements (got ", x.size(1), ")");
  return checked_input(x, op);
}

// Calls fn(start, len, values) for every chunk of blocks [first, end) with the chunk's float32 values.
template <typename Fn>
void for_block_chunks(const Source& src, int64_t numel, int64_t first, int64_t end, float* scratch, const Fn& fn) {
  for (int64_t block = first; block < end; ++block) {
    for_chunks_of_block(numel, block, [&](int64_t start, int64_t len) {
      fn(start, len, src.load(start, len, scratch));
    });
  }
}

int64_t block_count(int64_t numel) { return (numel + kBlock - 1) / kBlock; }

// ------------------------------------------------------------------------------------------------------------
// key_histogram, high digits: ++hist[c][key >> 16] with c = i % 2. Runs of equal buckets (typical of real data)
// would serialise increments of one counter on store-to-load forwarding: two copies break the chain. The loop
// is bound by the increments (about one per cycle); it computes the bins of the next 64 elements (vectorised,
// as uint16, read back four at a time) while it counts the current 64, so that reading the data overlaps the
// increments. Measured on this Zen 5, one thread, ns per element: random / sorted data 0.41 / 0.33 with all
// bins of a 4096-element chunk first, 0.27 / 0.22 interleaved (a sum of the same data: 0.14).

// bins[i] = order_key(x[i]) >> 16 as uint16, i < n.
template <bool kMag>
inline void compute_high(const float* __restrict x, int64_t n, uint16_t* __restrict bins) {
  int64_t i = 0;
#if defined(PK_AVX512)
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bins + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(order_keys16<kMag>(x + i), 16)));
  }
#endif
  for (; i < n; ++i) bins[i] = static_cast<uint16_t>(order_key<kMag>(x[i]) >> 16);
}

// The two copies lie kCopyStride counters apart: not a multiple of 4 KiB, so that increments of one bin in
// different copies do not falsely wait on each other (4K aliasing).
constexpr int64_t kCopyStride = kKeyBuckets + 80;
constexpr int64_t kHighGroup = 64;

// ++hist[...] of the kHighGroup bins (kCopies: 1, or 2 copies kCopyStride apart).
template <int kCopies, typename Count>
inline void count_group(const uint16_t* __restrict bins, Count* __restrict hist) {
  constexpr int64_t c1 = kCopies == 2 ? kCopyStride : 0;
  for (int64_t i = 0; i < kHighGroup; i += 4) {
    uint64_t four;
    std::memcpy(&four, bins + i, sizeof(four));
    ++hist[four & 0xFFFF];
    ++hist[c1 + ((four >> 16) & 0xFFFF)];
    ++hist[(four >> 32) & 0xFFFF];
    ++hist[c1 + (four >> 48)];
  }
}

template <bool kMag, int kCopies, typename Count>
void count_high(const float* __restrict x, int64_t len, Count* __restrict hist) {
  static_assert(kCopies == 1 || kCopies == 2, "one or two counter copies");
  alignas(64) uint16_t bins[2][kHighGroup];
  const int64_t groups = len / kHighGroup;
  if (groups > 0) {
    compute_high<kMag>(x, kHighGroup, bins[0]);
    for (int64_t g = 1; g < groups; ++g) {
      compute_high<kMag>(x + g * kHighGroup, kHighGroup, bins[g & 1]);
      count_group<kCopies>(bins[(g - 1) & 1], hist);
    }
    count_group<kCopies>(bins[(groups - 1) & 1], hist);
  }
  for (int64_t i = groups * kHighGroup; i < len; ++i) ++hist[order_key<kMag>(x[i]) >> 16];
}

template <bool kMag>
void high_histogram(const Source& src, int64_t numel, int64_t* total) {
  if (numel <= kBlock) {  // one block, one thread: count straight into the int64 result
    ChunkBuffers buf(1);
    for_block_chunks(src, numel, 0, block_count(numel), buf[0], [&](int64_t, int64_t len, const float* x) {
      count_high<kMag, 1>(x, len, total);
    });
    return;
  }
  // A copy costs zeroing and merging 256 KiB per thread: worth it for larger tensors only.
  const int copies = numel >= (int64_t(1) << 18) ? 2 : 1;
  const int64_t counters = (copies - 1) * kCopyStride + kKeyBuckets;
  std::mutex lock;
  parallel_blocks(numel, [&](int64_t first, int64_t end) {
    ChunkBuffers buf(1);
    const ThreadScratch scratch(kCountSlot, counters * sizeof(uint32_t));
    uint32_t* local = scratch.zeroed<uint32_t>(counters);  // < 2^31 elements per call: no overflow
    for_block_chunks(src, numel, first, end, buf[0], [&](int64_t, int64_t len, const float* x) {
      if (copies == 2) {
        count_high<kMag, 2>(x, len, local);
      } else {
        count_high<kMag, 1>(x, len, local);
      }
    });
    for (int c = 1; c < copies; ++c) {
      const uint32_t* h = local + c * kCopyStride;
      for (int64_t b = 0; b < kKeyBuckets; ++b) local[b] += h[b];  // < 2^31 in all: no overflow
    }
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t b = 0; b < kKeyBuckets; ++b) total[b] += local[b];
  });
}

// ------------------------------------------------------------------------------------------------------------
// key_histogram, low digits of the elements in a list of buckets, taken in groups of at most kGroup buckets per
// pass over the data. The keys of the elements in the group's buckets are compacted, turned into counter
// offsets (row in group << 16 | low) through a table high -> row, then counted. Up to kCompareBuckets buckets
// are matched by comparisons (min over b of high ^ bucket[b] is 0), more by looking the table up for every
// element (a gather, slower).

constexpr int64_t kGroup = 32;          // per thread at most 32 x 256 KiB of counters
constexpr int kCompareBuckets = 16;

struct BucketGroup {
  int64_t count = 0;
  const int32_t* row_of = nullptr;  // 2^16 entries: the bucket's row in the group, or -1
  uint32_t bucket[kCompareBuckets] = {};  // the first min(count, kCompareBuckets), then repeats of bucket[0]
};

#if defined(PK_AVX512)
// Keys of x[0, len / 16 * 16) in the group's buckets (bucket[0..kCount), kCount >= count), compacted; returns
// how many. `hit_keys` holds len + 16 entries.
template <bool kMag, int kCount>
int64_t compare_hits(const float* __restrict x, int64_t len, const BucketGroup& g, uint32_t* __restrict hit_keys) {
  __m512i bucket[kCount];
  for (int b = 0; b < kCount; ++b) bucket[b] = _mm512_set1_epi32(static_cast<int>(g.bucket[b]));
  int64_t n = 0;
  for (int64_t i = 0; i + 16 <= len; i += 16) {
    const __m512i key = order_keys16<kMag>(x + i);
    const __m512i high = _mm512_srli_epi32(key, 16);
    __m512i miss = _mm512_xor_si512(high, bucket[0]);
    for (int b = 1; b < kCount; ++b) miss = _mm512_min_epu32(miss, _mm512_xor_si512(high, bucket[b]));
    const __mmask16 hit = _mm512_testn_epi32_mask(miss, miss);
    _mm512_storeu_si512(hit_keys + n, _mm512_maskz_compress_epi32(hit, key));
    n += _mm_popcnt_u32(_cvtmask16_u32(hit));
  }
  return n;
}

template <bool kMag>
int64_t lookup_hits(const float* __restrict x, int64_t len, const BucketGroup& g, uint32_t* __restrict hit_keys) {
  int64_t n = 0;
  for (int64_t i = 0; i + 16 <= len; i += 16) {
    const __m512i key = order_keys16<kMag>(x + i);
    const __m512i row = _mm512_i32gather_epi32(_mm512_srli_epi32(key, 16), g.row_of, 4);
    const __mmask16 hit = _mm512_cmpge_epi32_mask(row, _mm512_setzero_si512());
    _mm512_storeu_si512(hit_keys + n, _mm512_maskz_compress_epi32(hit, key));
    n += _mm_popcnt_u32(_cvtmask16_u32(hit));
  }
  return n;
}
#endif

// Counter offsets of the chunk's elements whose bucket is in the group; `offsets` holds len + 16 entries.
template <bool kMag>
int64_t bucket_offsets(const float* __restrict x, int64_t len, const BucketGroup& g, uint32_t* __restrict offsets) {
  int64_t n = 0, i = 0;
#if defined(PK_AVX512)
  if (g.count == 1) {
    n = compare_hits<kMag, 1>(x, len, g, offsets);
  } else if (g.count <= 2) {
    n = compare_hits<kMag, 2>(x, len, g, offsets);
  } else if (g.count <= 4) {
    n = compare_hits<kMag, 4>(x, len, g, offsets);
  } else if (g.count <= 8) {
    n = compare_hits<kMag, 8>(x, len, g, offsets);
  } else if (g.count <= 16) {
    n = compare_hits<kMag, 16>(x, len, g, offsets);
  } else {
    n = lookup_hits<kMag>(x, len, g, offsets);
  }
  static_assert(kCompareBuckets == 16, "compare_hits instantiations cover 1..16 buckets");
  for (int64_t h = 0; h < n; ++h) {
    const uint32_t key = offsets[h];
    offsets[h] = (static_cast<uint32_t>(g.row_of[key >> 16]) << 16) | (key & 0xFFFFu);
  }
  i = len / 16 * 16;
#endif
  for (; i < len; ++i) {
    const uint32_t key = order_key<kMag>(x[i]);
    const int32_t row = g.row_of[key >> 16];
    offsets[n] = (static_cast<uint32_t>(row) << 16) | (key & 0xFFFFu);
    n += row >= 0;
  }
  return n;
}

// Counts of blocks [first, end) into counters (group x 2^16, zeroed by the caller); returns the hits. Hits are
// counted in bursts of up to kHitBuffer: their low bits are random, so counted one chunk at a time each would
// touch its own counter line, long evicted by the data streaming through the caches (15 ns per hit measured);
// a burst touches each line many times while it is cached.
constexpr int64_t kHitBuffer = int64_t(1) << 16;

template <bool kMag, typename Count>
int64_t count_low(const Source& src, int64_t numel, int64_t first, int64_t end, const BucketGroup& g,
                  Count* counters) {
  ChunkBuffers buf(1);
  const ThreadScratch hit_buffer(kTotalSlot, (kHitBuffer + kChunk + 16) * sizeof(uint32_t));
  uint32_t* offsets = hit_buffer.as<uint32_t>();
  int64_t held = 0, hits = 0;
  auto flush = [&] {
    for (int64_t h = 0; h < held; ++h) ++counters[offsets[h]];
    hits += held;
    held = 0;
  };
  for_block_chunks(src, numel, first, end, buf[0], [&](int64_t, int64_t len, const float* x) {
    held += bucket_offsets<kMag>(x, len, g, offsets + held);
    if (held >= kHitBuffer) flush();
  });
  flush();
  return hits;
}

// Rows [0, g.count) of `total` (int64, zeroed).
template <bool kMag>
void low_histograms(const Source& src, int64_t numel, const BucketGroup& g, int64_t* total) {
  if (numel <= kBlock) {  // one block, one thread: count straight into the int64 result
    count_low<kMag>(src, numel, 0, block_count(numel), g, total);
    return;
  }
  const int64_t counters = g.count * kKeyBuckets;
  std::mutex lock;
  parallel_blocks(numel, [&](int64_t first, int64_t end) {
    const ThreadScratch scratch(kCountSlot, counters * sizeof(uint32_t));
    uint32_t* local = scratch.zeroed<uint32_t>(counters);  // < 2^31 elements per call: no overflow
    if (count_low<kMag>(src, numel, first, end, g, local) == 0) return;
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t c = 0; c < counters; ++c) total[c] += local[c];
  });
}

at::Tensor key_histogram(const at::Tensor& x_in, bool magnitude, at::IntArrayRef buckets) {
  constexpr const char* op = "key_histogram";
  const at::Tensor x = checked_input(x_in, op);
  const int64_t nb = static_cast<int64_t>(buckets.size());
  if (nb > 0) {
    std::vector<bool> seen(kKeyBuckets, false);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t bucket = buckets[b];
      TORCH_CHECK(bucket >= 0 && bucket < kKeyBuckets, op, ": buckets[", b, "] = ", bucket,
                  " is outside [0, 65535]");
      TORCH_CHECK(!seen[bucket], op, ": buckets must be distinct (bucket ", bucket, " appears twice)");
      seen[bucket] = true;
    }
  }
  at::Tensor out = nb == 0 ? at::zeros({kKeyBuckets}, at::kLong) : at::zeros({nb, kKeyBuckets}, at::kLong);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const Source src(x);
  int64_t* total = out.data_ptr<int64_t>();
  with_bool(magnitude, [&](auto mag) {
    constexpr bool kMag = decltype(mag)::value;
    if (nb == 0) {
      high_histogram<kMag>(src, numel, total);
      return;
    }
    std::vector<int32_t> row_of(kKeyBuckets, -1);
    for (int64_t g0 = 0; g0 < nb; g0 += kGroup) {
      BucketGroup g;
      g.count = std::min(kGroup, nb - g0);
      g.row_of = row_of.data();
      for (int64_t b = 0; b < g.count; ++b) row_of[buckets[g0 + b]] = static_cast<int32_t>(b);
      for (int b = 0; b < kCompareBuckets; ++b) {
        g.bucket[b] = static_cast<uint32_t>(buckets[g0 + (b < g.count ? b : 0)]);
      }
      low_histograms<kMag>(src, numel, g, total + g0 * kKeyBuckets);
      for (int64_t b = 0; b < g.count; ++b) row_of[buckets[g0 + b]] = -1;
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// key_mask: mask = key > K, or key == K among the first `ties` such elements in flat index order.
// Pass 1 writes key >= K (key > K when ties == 0) and counts the ties of each block; only blocks holding ties
// past the first `ties` (from an exclusive prefix over blocks) are read again to clear those.

template <bool kMag>
int64_t mask_chunk(const float* __restrict x, int64_t len, uint32_t key, bool with_ties, uint8_t* __restrict out) {
  int64_t ties = 0, i = 0;
#if defined(PK_AVX512)
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key));
  const __m128i one = _mm_set1_epi8(1);
  for (; i + 16 <= len; i += 16) {
    const __m512i keys = order_keys16<kMag>(x + i);
    const __mmask16 eq = _mm512_cmpeq_epi32_mask(keys, k);
    const __mmask16 gt = _mm512_cmpgt_epu32_mask(keys, k);
    const __mmask16 m = with_ties ? static_cast<__mmask16>(gt | eq) : gt;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_maskz_mov_epi8(m, one));
    ties += _mm_popcnt_u32(_cvtmask16_u32(eq));
  }
#endif
  for (; i < len; ++i) {
    const uint32_t k = order_key<kMag>(x[i]);
    out[i] = k > key || (with_ties && k == key);
    ties += k == key;
  }
  return ties;
}

// Calls visit(i) for every i < len with order_key(x[i]) == key, in ascending order, while visit returns true.
template <bool kMag, typename Visit>
void for_each_equal(const float* __restrict x, int64_t len, uint32_t key, const Visit& visit) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key));
  for (; i + 16 <= len; i += 16) {
    for (uint32_t eq = _cvtmask16_u32(_mm512_cmpeq_epi32_mask(order_keys16<kMag>(x + i), k)); eq != 0; eq &= eq - 1) {
      if (!visit(i + __builtin_ctz(eq))) return;
    }
  }
#endif
  for (; i < len; ++i) {
    if (order_key<kMag>(x[i]) == key && !visit(i)) return;
  }
}

// Clears the ties of a chunk once `seen` (ties before it in index order) reaches `ties`.
template <bool kMag>
void clear_late_ties(const float* __restrict x, int64_t len, uint32_t key, int64_t ties, int64_t& seen,
                     uint8_t* __restrict out) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key));
  const __m128i one = _mm_set1_epi8(1);
  for (; i + 16 <= len; i += 16) {
    const __m512i keys = order_keys16<kMag>(x + i);
    uint32_t eq = _cvtmask16_u32(_mm512_cmpeq_epi32_mask(keys, k));
    if (eq == 0) continue;
    if (seen >= ties) {  // every tie here is past the first `ties`: the mask is key > K
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm_maskz_mov_epi8(_mm512_cmpgt_epu32_mask(keys, k), one));
      seen += _mm_popcnt_u32(eq);
      continue;
    }
    for (; eq != 0; eq &= eq - 1) {
      if (seen++ >= ties) out[i + __builtin_ctz(eq)] = 0;
    }
  }
#endif
  for (; i < len; ++i) {
    if (order_key<kMag>(x[i]) == key && seen++ >= ties) out[i] = 0;
  }
}

at::Tensor key_mask(const at::Tensor& x_in, bool magnitude, int64_t key, int64_t ties) {
  constexpr const char* op = "key_mask";
  TORCH_CHECK(key >= 0 && key <= kKeyLimit, op, ": key must be in [0, 2^32] (got ", key, ")");
  TORCH_CHECK(ties >= 0, op, ": ties must be >= 0 (got ", ties, ")");
  const at::Tensor x = checked_input(x_in, op);
  const int64_t numel = x.numel();
  if (key == kKeyLimit || numel == 0) return at::zeros(x.sizes(), at::kBool);  // nothing above 2^32, no ties
  at::Tensor out = at::empty(x.sizes(), at::kBool);
  uint8_t* mask = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const Source src(x);
  const uint32_t k = static_cast<uint32_t>(key);
  const bool with_ties = ties > 0;
  const int64_t blocks = block_count(numel);
  std::vector<int64_t> block_ties(blocks, 0);
  with_bool(magnitude, [&](auto mag) {
    constexpr bool kMag = decltype(mag)::value;
    parallel_blocks(numel, [&](int64_t first, int64_t end) {
      ChunkBuffers buf(1);
      for_block_chunks(src, numel, first, end, buf[0], [&](int64_t start, int64_t len, const float* v) {
        block_ties[start / kBlock] += mask_chunk<kMag>(v, len, k, with_ties, mask + start);
      });
    });
    if (!with_ties) return;
    // Blocks whose ties are not all among the first `ties`, with the ties before each.
    std::vector<int64_t> fix_block, fix_seen;
    int64_t before = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_ties[b] > 0 && before + block_ties[b] > ties) {
        fix_block.push_back(b);
        fix_seen.push_back(before);
      }
      before += block_ties[b];
    }
    at::parallel_for(0, static_cast<int64_t>(fix_block.size()), 1, [&](int64_t first, int64_t end) {
      ChunkBuffers buf(1);
      for (int64_t f = first; f < end; ++f) {
        int64_t seen = fix_seen[f];
        for_block_chunks(src, numel, fix_block[f], fix_block[f] + 1, buf[0],
                         [&](int64_t start, int64_t len, const float* v) {
                           clear_late_ties<kMag>(v, len, k, ties, seen, mask + start);
                         });
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// key_find: elements with key == K counted per block, then one block scanned for the rank-th.

template <bool kMag>
int64_t count_equal(const float* __restrict x, int64_t len, uint32_t key) {
  int64_t n = 0, i = 0;
#if defined(PK_AVX512)
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key));
  for (; i + 16 <= len; i += 16) {
    n += _mm_popcnt_u32(_cvtmask16_u32(_mm512_cmpeq_epi32_mask(order_keys16<kMag>(x + i), k)));
  }
#endif
  for (; i < len; ++i) n += order_key<kMag>(x[i]) == key;
  return n;
}

at::Tensor key_find(const at::Tensor& x_in, bool magnitude, int64_t key, int64_t rank) {
  constexpr const char* op = "key_find";
  TORCH_CHECK(key >= 0 && key < kKeyLimit, op, ": key must be in [0, 2^32 - 1] (got ", key, ")");
  const at::Tensor x = checked_input(x_in, op);
  const int64_t numel = x.numel();
  int64_t found = -1;
  if (rank >= 1 && rank <= numel) {
    const Source src(x);
    const uint32_t k = static_cast<uint32_t>(key);
    const int64_t blocks = block_count(numel);
    std::vector<int64_t> block_hits(blocks, 0);
    with_bool(magnitude, [&](auto mag) {
      constexpr bool kMag = decltype(mag)::value;
      parallel_blocks(numel, [&](int64_t first, int64_t end) {
        ChunkBuffers buf(1);
        for_block_chunks(src, numel, first, end, buf[0], [&](int64_t start, int64_t len, const float* v) {
          block_hits[start / kBlock] += count_equal<kMag>(v, len, k);
        });
      });
      int64_t left = rank, block = 0;
      while (block < blocks && left > block_hits[block]) left -= block_hits[block++];
      if (block == blocks) return;  // fewer than `rank` hits
      ChunkBuffers buf(1);
      for_block_chunks(src, numel, block, block + 1, buf[0], [&](int64_t start, int64_t len, const float* v) {
        if (found >= 0) return;
        for_each_equal<kMag>(v, len, k, [&](int64_t i) {
          if (--left > 0) return true;
          found = start + i;
          return false;
        });
      });
    });
  }
  return at::scalar_tensor(found, at::kLong);
}

// ------------------------------------------------------------------------------------------------------------
// Row ops

// Order keys of one row at a time, into buffers owned by one parallel call (so by one thread).
class RowKeys {
 public:
  RowKeys(const at::Tensor& x, bool magnitude)
      : src_(x), n_(x.size(1)), magnitude_(magnitude), values_(x.scalar_type() == at::kFloat ? 0 : n_), keys_(n_) {}

  const uint32_t* operator()(int64_t row) {
    const float* v = src_.load(row * n_, n_, values_.data());
    if (magnitude_) {
      compute_keys<true>(v, n_, keys_.data());
    } else {
      compute_keys<false>(v, n_, keys_.data());
    }
    return keys_.data();
  }

 private:
  Source src_;
  int64_t n_;
  bool magnitude_;
  std::vector<float> values_;
  std::vector<uint32_t> keys_;
};

// at::parallel_for over rows of n elements, with at least ~32K elements per parallel call.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t n, const Fn& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(n, 1)), fn);
}

// Unique descending-order composite of (key, index): larger key first, then smaller index first.
inline uint64_t composite(uint32_t key, int64_t index) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}
inline int64_t composite_index(uint64_t c) { return 0xFFFFFFFFu - static_cast<uint32_t>(c); }

void fill_composites(const uint32_t* keys, int64_t n, uint64_t* c) {
  for (int64_t j = 0; j < n; ++j) c[j] = composite(keys[j], j);
}

// k-th largest composites of one row at a time. Long rows take one radix step first: a histogram of the top
// kRowBinBits bits of the keys gives the bin holding the k-th, and std::nth_element runs only on that bin's
// elements (all of them in the worst case, a heavily tied row: then it is the plain selection).
constexpr int kRowBinBits = 11;
constexpr int kRowBins = 1 << kRowBinBits;
constexpr int64_t kRadixRowMin = 1024;  // shorter rows: nth_element on the whole row
constexpr int kRadixMaxPositions = 8;   // more positions per row: successive nth_element on the whole row

class RowSelector {
 public:
  explicit RowSelector(int64_t n) : n_(n), hist_(kRowBins), candidates_(n) {}

  bool radix(size_t positions) const { return n_ >= kRadixRowMin && positions <= kRadixMaxPositions; }

  // The bins of the row's keys (once per row, before kth).
  void count(const uint32_t* keys) {
    std::fill(hist_.begin(), hist_.end(), 0u);
    uint32_t* h = hist_.data();
    for (int64_t j = 0; j < n_; ++j) ++h[keys[j] >> (32 - kRowBinBits)];
  }

  // The k-th (1-based) largest composite of the counted row.
  uint64_t kth(const uint32_t* keys, int64_t k) {
    int64_t above = 0;
    uint32_t bin = kRowBins - 1;
    while (above + hist_[bin] < k) above += hist_[bin--];
    uint64_t* c = candidates_.data();
    int64_t m = 0;
    for (int64_t j = 0; j < n_; ++j) {  // branch-free compaction of the bin's elements
      c[m] = composite(keys[j], j);
      m += (keys[j] >> (32 - kRowBinBits)) == bin;
    }
    const int64_t at = k - above - 1;
    std::nth_element(c, c + at, c + m, std::greater<uint64_t>());
    return c[at];
  }

  // Successive selections of ascending 1-based positions on the whole row: picked[p] = index at positions[p].
  void select_all(const uint32_t* keys, const std::vector<int64_t>& positions, int64_t* picked) {
    uint64_t* c = candidates_.data();
    fill_composites(keys, n_, c);
    int64_t lo = 0;
    for (size_t p = 0; p < positions.size(); ++p) {
      const int64_t at = positions[p] - 1;
      std::nth_element(c + lo, c + at, c + n_, std::greater<uint64_t>());
      picked[p] = composite_index(c[at]);
      lo = at + 1;
    }
  }

 private:
  int64_t n_;
  std::vector<uint32_t> hist_;
  std::vector<uint64_t> candidates_;
};

at::Tensor row_select(const at::Tensor& x_in, bool magnitude, at::IntArrayRef ks) {
  constexpr const char* op = "row_select";
  const at::Tensor x = checked_rows(x_in, op);
  const int64_t rows = x.size(0), n = x.size(1), m = static_cast<int64_t>(ks.size());
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(ks[j] >= 1 && ks[j] <= n, op, ": ks[", j, "] = ", ks[j], " is outside [1, n] with n = ", n);
  }
  at::Tensor out = at::empty({rows, m}, at::kLong);
  if (m == 0) return out;
  std::vector<int64_t> positions(ks.begin(), ks.end());  // distinct, ascending
  std::sort(positions.begin(), positions.end());
  positions.erase(std::unique(positions.begin(), positions.end()), positions.end());
  std::vector<size_t> slot(m);
  for (int64_t j = 0; j < m; ++j) {
    slot[j] = std::lower_bound(positions.begin(), positions.end(), ks[j]) - positions.begin();
  }
  int64_t* result = out.data_ptr<int64_t>();
  parallel_rows(rows, n, [&](int64_t first, int64_t end) {
    RowKeys row_keys(x, magnitude);
    RowSelector selector(n);
    std::vector<int64_t> picked(positions.size());
    for (int64_t r = first; r < end; ++r) {
      const uint32_t* keys = row_keys(r);
      if (selector.radix(positions.size())) {
        selector.count(keys);
        for (size_t p = 0; p < positions.size(); ++p) picked[p] = composite_index(selector.kth(keys, positions[p]));
      } else {
        selector.select_all(keys, positions, picked.data());
      }
      for (int64_t j = 0; j < m; ++j) result[r * m + j] = picked[slot[j]];
    }
  });
  return out;
}

at::Tensor row_topk_mask(const at::Tensor& x_in, bool magnitude, int64_t k) {
  constexpr const char* op = "row_topk_mask";
  const at::Tensor x = checked_rows(x_in, op);
  const int64_t n = x.size(1);
  TORCH_CHECK(k >= 0 && k <= n, op, ": k = ", k, " is outside [0, n] with n = ", n);
  if (k == 0) return at::zeros(x.sizes(), at::kBool);
  if (k == n) return at::ones(x.sizes(), at::kBool);
  at::Tensor out = at::empty(x.sizes(), at::kBool);
  uint8_t* mask = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const int64_t rows = x.size(0);
  const std::vector<int64_t> position{k};
  parallel_rows(rows, n, [&](int64_t first, int64_t end) {
    RowKeys row_keys(x, magnitude);
    RowSelector selector(n);
    int64_t index = 0;
    for (int64_t r = first; r < end; ++r) {
      const uint32_t* keys = row_keys(r);
      if (selector.radix(1)) {
        selector.count(keys);
        index = composite_index(selector.kth(keys, k));
      } else {
        selector.select_all(keys, position, &index);
      }
      // keep exactly the composites >= the k-th largest
      const uint64_t kth = composite(keys[index], index);
      uint8_t* row = mask + r * n;
      for (int64_t j = 0; j < n; ++j) row[j] = composite(keys[j], j) >= kth;
    }
  });
  return out;
}

at::Tensor row_rank(const at::Tensor& x_in, bool magnitude) {
  constexpr const char* op = "row_rank";
  const at::Tensor x = checked_rows(x_in, op);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, n}, at::kLong);
  if (rows == 0 || n == 0) return out;
  int64_t* ranks = out.data_ptr<int64_t>();
  parallel_rows(rows, n, [&](int64_t first, int64_t end) {
    RowKeys row_keys(x, magnitude);
    RowSortScratch scratch;
    for (int64_t r = first; r < end; ++r) {
      stable_key_ranks(row_keys(r), n, ranks + r * n, scratch);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("key_histogram", &key_histogram);
  m.impl("key_mask", &key_mask);
  m.impl("key_find", &key_find);
  m.impl("row_select", &row_select);
  m.impl("row_topk_mask", &row_topk_mask);
  m.impl("row_rank", &row_rank);
}

}  // namespace cpu
}  // namespace pykernels
