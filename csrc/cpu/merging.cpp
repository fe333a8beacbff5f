// CPU kernels of the task-vector merge primitives (CONTRACT: delta_topk_thresholds, delta_l1_norms,
// fused_merge, philox_uniform). Every op streams the flat index range in fixed chunks (chunk_io.h); the fused
// merge evaluates merge_element() of common/merge_math.h over a chunk at a time (the same float32 operations
// in the same order per element, so bit-identical to it, but in loops that vectorise).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/merge_math.h"
#include "common/philox.h"
#include "cpu/chunk_io.h"
#include "cpu/philox_simd.h"
#include "cpu/radix_select.h"

namespace pykernels {
namespace cpu {

namespace {

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

DeltaInputs make_delta_inputs(const c10::optional<at::Tensor>& base, at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": tensors must hold at least one model (got 0)");
  TORCH_CHECK(tensors.size() <= static_cast<size_t>(kMaxModels), op, ": at most ", kMaxModels,
              " models are supported (got ", tensors.size(), ")");
  DeltaInputs in;
  in.numel = tensors[0].numel();
  auto add = [&](const at::Tensor& t, const char* name, size_t index) -> Source {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", index, "] is on ", t.device(), ", expected cpu");
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, "[", index, "] has dtype ", t.scalar_type(),
                ", expected float32, bfloat16 or float16");
    TORCH_CHECK(t.sizes() == tensors[0].sizes(), op, ": ", name, "[", index, "] has shape ", t.sizes(),
                " but tensors[0] has shape ", tensors[0].sizes());
    in.owned.push_back(t.contiguous());
    return Source(in.owned.back());
  };
  in.owned.reserve(tensors.size() + 1);
  if (base.has_value()) {
    in.base = add(*base, "base", 0);
    in.has_base = true;
  }
  for (size_t m = 0; m < tensors.size(); ++m) in.models.push_back(add(tensors[m], "tensors", m));
  return in;
}

namespace {

// ------------------------------------------------------------------------------------------------------------
// Sparsifier masks, one chunk at a time.

// How model m's keep mask is decided, with the degenerate cases resolved once per call.
struct KeepRule {
  enum Kind { kAll, kNone, kThreshold, kRandom, kBand } kind = kAll;
  uint32_t key = 0;  // kThreshold: keep mkey > key, or mkey == key at index <= cutoff ("above (key, cutoff)")
  int64_t cutoff = -1;
  uint32_t key_b = 0;  // kBand: keep above (key, cutoff) and not above (key_b, cutoff_b)
  int64_t cutoff_b = -1;
  uint64_t seed = 0;  // kRandom: keep philox_uniform(seed, j) < p, i.e. x_j < limit (philox_keep_limit)
  float p = 1.f;
  uint32_t limit = 0;
  const uint16_t* bits = nullptr;  // kRandom: the keep decisions drawn already, packed (unpack_keep)
};

// One (key, cutoff) of keep_by_threshold as the set it selects: mkey lies in [0, 2^31), so a negative key
// selects everything and a key >= 2^31 nothing.
enum class Above { kAll, kNone, kSome };
Above classify(int64_t key) { return key < 0 ? Above::kAll : key > 0x7FFFFFFF ? Above::kNone : Above::kSome; }

KeepRule band_rule(int64_t key_a, int64_t cutoff_a, int64_t key_b, int64_t cutoff_b) {
  KeepRule r;
  const Above a = classify(key_a), b = classify(key_b);
  if (a == Above::kNone || b == Above::kAll) {
    r.kind = KeepRule::kNone;
  } else if (b == Above::kNone) {  // a plain top-k (or everything): the magnitude rule, one threshold
    r = a == Above::kAll ? KeepRule{} : KeepRule{KeepRule::kThreshold, static_cast<uint32_t>(key_a), cutoff_a};
  } else {
    r.kind = KeepRule::kBand;
    // above(a) for every element when a selects everything: key 0 with every index counted as a tie
    r.key = a == Above::kAll ? 0u : static_cast<uint32_t>(key_a);
    r.cutoff = a == Above::kAll ? INT64_MAX : cutoff_a;
    r.key_b = static_cast<uint32_t>(key_b);
    r.cutoff_b = cutoff_b;
  }
  return r;
}

std::vector<KeepRule> keep_rules(int n, int64_t sparsifier, const at::Tensor& thresholds,
                                 at::ArrayRef<double> keep_probs, int64_t seed, const char* op) {
  TORCH_CHECK(sparsifier >= kNoSparsify && sparsifier <= kBand, op,
              ": sparsifier must be 0 (none), 1 (magnitude), 2 (random) or 3 (band) (got ", sparsifier, ")");
  std::vector<KeepRule> rules(n);
  const int columns = threshold_columns(static_cast<int>(sparsifier));
  if (columns > 0) {
    TORCH_CHECK(thresholds.defined() && thresholds.dim() == 2 && thresholds.size(0) == n &&
                    thresholds.size(1) == columns,
                op, ": thresholds must have shape (", n, ", ", columns, ") for sparsifier ", sparsifier, " (",
                sparsifier == kBand ? "band" : "magnitude", ") (got ",
                thresholds.defined() ? thresholds.sizes() : at::IntArrayRef{}, ")");
    TORCH_CHECK(!at::isFloatingType(thresholds.scalar_type()) && !at::isComplexType(thresholds.scalar_type()), op,
                ": thresholds must be an integer tensor (got ", thresholds.scalar_type(), ")");
  }
  if (sparsifier == kMagnitude) {
    const at::Tensor t = thresholds.to(at::kCPU, at::kLong).contiguous();
    const int64_t* rows = t.data_ptr<int64_t>();
    for (int m = 0; m < n; ++m) {
      const int64_t key = rows[2 * m], cutoff = rows[2 * m + 1];
      switch (classify(key)) {
        case Above::kAll:
          rules[m].kind = KeepRule::kAll;
          break;
        case Above::kNone:
          rules[m].kind = KeepRule::kNone;
          break;
        case Above::kSome:
          rules[m] = KeepRule{KeepRule::kThreshold, static_cast<uint32_t>(key), cutoff};
          break;
      }
    }
  } else if (sparsifier == kBand) {
    const at::Tensor t = thresholds.to(at::kCPU, at::kLong).contiguous();
    const int64_t* rows = t.data_ptr<int64_t>();
    for (int m = 0; m < n; ++m) rules[m] = band_rule(rows[4 * m], rows[4 * m + 1], rows[4 * m + 2], rows[4 * m + 3]);
  } else if (sparsifier == kRandom) {
    TORCH_CHECK(static_cast<int>(keep_probs.size()) == n, op, ": keep_probs must have ", n, " entries (got ",
                keep_probs.size(), ")");
    for (int m = 0; m < n; ++m) {
      if (keep_probs[m] >= 1.0) continue;  // kAll
      rules[m].kind = KeepRule::kRandom;
      rules[m].seed = model_seed(static_cast<uint64_t>(seed), m);
      rules[m].p = static_cast<float>(keep_probs[m]);
      rules[m].limit = philox_keep_limit(rules[m].p);
    }
  }
  return rules;
}

// Compile-time dispatch of the keep rule (see with_bool).
template <typename Fn>
void with_keep_kind(KeepRule::Kind kind, Fn&& fn) {
  switch (kind) {
    case KeepRule::kAll:
      return fn(std::integral_constant<int, KeepRule::kAll>{});
    case KeepRule::kNone:
      return fn(std::integral_constant<int, KeepRule::kNone>{});
    case KeepRule::kThreshold:
      return fn(std::integral_constant<int, KeepRule::kThreshold>{});
    case KeepRule::kRandom:
      return fn(std::integral_constant<int, KeepRule::kRandom>{});
    case KeepRule::kBand:
      return fn(std::integral_constant<int, KeepRule::kBand>{});
  }
}

// j <= cutoff as a chunk-local int32 comparison i <= last: cutoff - start clamped to [-1, len].
inline int32_t chunk_last(int64_t cutoff, int64_t start, int64_t len) {
  return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(cutoff - start, -1), len));
}

// Model m's keep decision for the elements of one chunk; `drawn` holds the chunk's random decisions (kRandom).
template <int kKind>
struct KeepTest {
  KeepTest(const KeepRule& rule, int64_t start, int64_t len, const uint8_t* drawn)
      : key(rule.key),
        last(chunk_last(rule.cutoff, start, len)),
        key_b(rule.key_b),
        last_b(chunk_last(rule.cutoff_b, start, len)),
        kept(drawn) {}

  bool operator()(float d, int32_t i) const {
    if (kKind == KeepRule::kAll) return true;
    if (kKind == KeepRule::kNone) return false;
    if (kKind == KeepRule::kRandom) return kept[i] != 0;
    const uint32_t k = mkey(d);
    if (kKind == KeepRule::kBand) {
      // above(key, last) <=> k >= key + (i > last) (no overflow: key < 2^31), so the band is
      // lo <= k < hi with both bounds a key plus one where the index lies past its cutoff.
      const uint32_t lo = key + static_cast<uint32_t>(i > last);
      const uint32_t hi = key_b + static_cast<uint32_t>(i > last_b);
      return (k >= lo) & (k < hi);
    }
    return (k > key) | ((k == key) & (i <= last));
  }

  uint32_t key;
  int32_t last;
  uint32_t key_b;  // kBand only
  int32_t last_b;
  const uint8_t* kept;
};

// Keep decisions packed 16 to a word: bit i % 16 of words[i / 16] is keep[i].
void unpack_keep(const uint16_t* __restrict words, int64_t len, uint8_t* __restrict keep) {
  int64_t i = 0;
#if defined(PK_AVX512)
  for (; i + 16 <= len; i += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + i), _mm_maskz_mov_epi8(words[i / 16], _mm_set1_epi8(1)));
  }
#endif
  for (; i < len; ++i) keep[i] = (words[i / 16] >> (i % 16)) & 1;
}

// The packed decisions of a kRandom rule for [start, start + len): the ones drawn already, or drawn now into
// `scratch`. `start` is a multiple of 16 (chunks and slices are).
const uint16_t* keep_words(const KeepRule& rule, int64_t start, int64_t len, uint16_t* scratch) {
  if (rule.bits != nullptr) return rule.bits + start / 16;
  philox_keep_words(rule.seed, rule.limit, rule.p, start, len, scratch);
  return scratch;
}

// The chunk's keep decisions of a kRandom rule as bytes (into `scratch`), else nullptr.
const uint8_t* draw_keep(const KeepRule& rule, int64_t start, int64_t len, uint8_t* scratch) {
  if (rule.kind != KeepRule::kRandom) return nullptr;
  uint16_t words[kChunk / 16];
  unpack_keep(keep_words(rule, start, len, words), len, scratch);
  return scratch;
}

inline bool nonfinite(float x) { return !(std::fabs(x) <= FLT_MAX); }  // NaN compares false

// ------------------------------------------------------------------------------------------------------------
// delta_l1_norms

// d = x - b (x without a base) and its keep mask, for one chunk of one model.
template <bool kBase, int kKind>
void delta_and_keep(const float* __restrict x, const float* __restrict b, const KeepTest<kKind>& keep_of,
                    int32_t len, float* __restrict d, uint8_t* __restrict keep) {
  for (int32_t i = 0; i < len; ++i) {
    const float v = kBase ? x[i] - b[i] : x[i];
    d[i] = v;
    keep[i] = keep_of(v, i);
  }
}

}  // namespace

namespace {

// 16 float64 accumulator pairs: lane l sums |d[i]| (all) and the kept |d[i]| of the elements i = l (mod 16) of
// a chunk in index order; fold() then adds the lanes in order. The AVX-512 and scalar loops perform exactly the
// same additions.
struct L1Lanes {
  alignas(64) double all[16] = {};
  alignas(64) double kept[16] = {};

  void fold(double& all_sum, double& kept_sum) const {
    for (int l = 0; l < 16; ++l) {
      all_sum += all[l];
      kept_sum += kept[l];
    }
  }
};

#if defined(PK_AVX512)
// The lanes of L1Lanes in registers.
struct L1Registers {
  explicit L1Registers(const L1Lanes& l)
      : all_lo(_mm512_load_pd(l.all)), all_hi(_mm512_load_pd(l.all + 8)),
        kept_lo(_mm512_load_pd(l.kept)), kept_hi(_mm512_load_pd(l.kept + 8)) {}

  void add(__m512 d, __mmask16 keep) {
    const __m512 a = _mm512_abs_ps(d);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    all_lo = _mm512_add_pd(all_lo, lo);
    all_hi = _mm512_add_pd(all_hi, hi);
    kept_lo = _mm512_mask_add_pd(kept_lo, static_cast<__mmask8>(keep), kept_lo, lo);
    kept_hi = _mm512_mask_add_pd(kept_hi, static_cast<__mmask8>(keep >> 8), kept_hi, hi);
  }

  void store(L1Lanes& l) const {
    _mm512_store_pd(l.all, all_lo);
    _mm512_store_pd(l.all + 8, all_hi);
    _mm512_store_pd(l.kept, kept_lo);
    _mm512_store_pd(l.kept + 8, kept_hi);
  }

  __m512d all_lo, all_hi, kept_lo, kept_hi;
};
#endif

// Adds d[i], i < len, to lane i % 16 (the first element must belong to lane 0).
void add_l1_lanes(const float* __restrict d, const uint8_t* __restrict keep, int64_t len, L1Lanes& lanes) {
  int64_t i = 0;
#if defined(PK_AVX512)
  L1Registers acc(lanes);
  for (; i + 16 <= len; i += 16) {
    acc.add(_mm512_loadu_ps(d + i),
            _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + i)), _mm_set1_epi8(1)));
  }
  acc.store(lanes);
#endif
  for (; i < len; ++i) {
    const double a = std::fabs(static_cast<double>(d[i]));
    lanes.all[i % 16] += a;
    lanes.kept[i % 16] += keep[i] ? a : 0.0;
  }
}

}  // namespace

// (sum |d|, sum of kept |d|) of one chunk in float64, in the fixed order of L1Lanes. (Declared in chunk_io.h:
// della.cpp sums its rows with it.)
void l1_chunk(const float* __restrict d, const uint8_t* __restrict keep, int64_t len, double& all, double& kept) {
  L1Lanes lanes;
  add_l1_lanes(d, keep, len, lanes);
  lanes.fold(all, kept);
}

namespace {

void prefetch_inputs(const DeltaInputs& in, int64_t start, int64_t len) {
  if (in.has_base) in.base.prefetch(start, len);
  for (const Source& m : in.models) m.prefetch(start, len);
}

// l1_chunk of a kRandom model, with d = x - b computed in registers and the
// decisions drawn 32 at a time straight into masks (no keep or d arrays), packed into `bits` (if not null)
// on the way. The same additions as l1_chunk. `start` is a multiple of 32, as every chunk's.
template <bool kBase>
void l1_random_chunk(const KeepRule& rule, const float* __restrict x, const float* __restrict b, int64_t start,
                     int64_t len, L1Lanes& lanes, uint16_t* bits, float* __restrict d_rest,
                     uint8_t* __restrict keep_rest) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const PhiloxKeys key(rule.seed);
  const __m512i bound = _mm512_set1_epi32(static_cast<int32_t>(rule.limit));
  L1Registers acc(lanes);
  for (; i + 32 <= len && same_high_word(start + i); i += 32) {
    __m512i draws[2];
    philox_x32(key, start + i, draws);
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 16 * h;
      const __mmask16 keep = _mm512_cmplt_epu32_mask(draws[h], bound);
      const __m512 xv = _mm512_loadu_ps(x + j);
      acc.add(kBase ? _mm512_sub_ps(xv, _mm512_loadu_ps(b + j)) : xv, keep);
      if (bits != nullptr) bits[j / 16] = keep;
    }
  }
  acc.store(lanes);
#endif
  const int64_t rest = len - i;  // i is a multiple of 16: lanes line up
  uint16_t rest_words[kChunk / 16];
  uint16_t* words = bits != nullptr ? bits + i / 16 : rest_words;
  philox_keep_words(rule.seed, rule.limit, rule.p, start + i, rest, words);
  unpack_keep(words, rest, keep_rest);
  for (int64_t j = 0; j < rest; ++j) d_rest[j] = kBase ? x[i + j] - b[i + j] : x[i + j];
  add_l1_lanes(d_rest, keep_rest, rest, lanes);
}

// (sum |d_m|, sum |kept d_m|) of every model: n x 2 float64, row-major. For a kRandom model, a non-null
// record[m] also receives its keep decisions, packed, so that a later pass can reuse them instead of drawing
// them again.
std::vector<double> l1_norms(const DeltaInputs& in, const std::vector<KeepRule>& rules, uint16_t* const* record) {
  const int n = in.n();
  const int64_t blocks = (in.numel + kBlock - 1) / kBlock;
  // Partial sums per fixed block, added in block order afterwards: identical for any thread count.
  std::vector<double> partial(static_cast<size_t>(blocks) * n * 2, 0.0);
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    ChunkBuffers buf(3);  // base, model, d
    std::vector<uint8_t> keep(kChunk);
    for (int64_t block = first; block < end; ++block) {
      double* sums = partial.data() + block * n * 2;
      for_chunks_of_block(in.numel, block, [&](int64_t start, int64_t len) {
        if (start + len < in.numel) prefetch_inputs(in, start + len, std::min(kChunk, in.numel - start - len));
        const float* b = in.load_base(start, len, buf[0]);
        for (int m = 0; m < n; ++m) {
          const float* x = in.models[m].load(start, len, buf[1]);
          uint16_t* bits = record != nullptr && record[m] != nullptr ? record[m] + start / 16 : nullptr;
          L1Lanes lanes;
          if (rules[m].kind == KeepRule::kRandom) {
            with_bool(b != nullptr, [&](auto has_base) {
              l1_random_chunk<decltype(has_base)::value>(rules[m], x, b, start, len, lanes, bits, buf[2],
                                                         keep.data());
            });
          } else {
            with_bool(b != nullptr, [&](auto has_base) {
              with_keep_kind(rules[m].kind, [&](auto kind) {
                const KeepTest<decltype(kind)::value> keep_of(rules[m], start, len, nullptr);  // not kRandom
                delta_and_keep<decltype(has_base)::value>(x, b, keep_of, static_cast<int32_t>(len), buf[2],
                                                          keep.data());
              });
            });
            add_l1_lanes(buf[2], keep.data(), len, lanes);
          }
          lanes.fold(sums[2 * m], sums[2 * m + 1]);
        }
      });
    }
  });
  std::vector<double> rows(static_cast<size_t>(n) * 2, 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int i = 0; i < 2 * n; ++i) rows[i] += partial[block * n * 2 + i];
  }
  return rows;
}

at::Tensor delta_l1_norms(const c10::optional<at::Tensor>& base, at::TensorList tensors, int64_t sparsifier,
                          const at::Tensor& thresholds, at::ArrayRef<double> keep_probs, int64_t seed) {
  const char* op = "pykernels::delta_l1_norms";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const std::vector<double> rows =
      l1_norms(in, keep_rules(in.n(), sparsifier, thresholds, keep_probs, seed, op), nullptr);
  return at::tensor(rows, at::kDouble).reshape({in.n(), 2});
}

// ------------------------------------------------------------------------------------------------------------
// fused_merge: merge_element() evaluated over a chunk at a time, model by model. Every element sees exactly the
// float32 operations of merge_element in the same order (sums start at 0 and add the models in order), so the
// result is bit-identical to it, while every loop below runs over contiguous buffers and vectorises.

enum Accumulate : int {
  kMixAll = 0,      // no consensus: acc += weighted
  kSumSigns = 1,    // consensus sum: acc (= total) += elector
  kCountSigns = 2,  // consensus count: acc (= total) += sign(elector)
};

struct MergeScratch {
  explicit MergeScratch(int n) : floats(6 + 2 * n), bad(kChunk) {}
  float* base() const { return floats[0]; }
  float* x() const { return floats[1]; }
  float* spare() const { return floats[2]; }  // the drawn keep decisions (bytes), later the poison pass's loads
  uint8_t* drawn() const { return reinterpret_cast<uint8_t*>(floats[2]); }
  float* acc() const { return floats[3]; }  // mixed (no consensus) or the election total
  float* mixed() const { return floats[4]; }
  float* divisor() const { return floats[5]; }
  float* weighted(int m) const { return floats[6 + 2 * m]; }
  float* elector(int m) const { return floats[7 + 2 * m]; }  // only with an unweighted sign source
  ChunkBuffers floats;
  std::vector<uint8_t> bad;  // an input is NaN/Inf
};

// The largest exponent field of x: 0x7F800000 iff some x[i] is NaN/Inf. A reduction, so it vectorises.
inline uint32_t max_exponent(const float* __restrict x, int32_t len) {
  uint32_t e = 0;
  for (int32_t i = 0; i < len; ++i) e = std::max(e, float_bits(x[i]) & 0x7F800000u);
  return e;
}

// One model's pass over a chunk: d, keep, s = keep ? d * scale : 0, weighted = w * s, and the running sum of
// merge_element's first loop over models (mixed, or the election total). Returns whether x has a NaN/Inf.
template <bool kBase, int kKind, int kAcc, bool kUnweighted>
bool model_pass(const float* __restrict x, const float* __restrict b, const KeepTest<kKind>& keep_of, float scale,
                float weight, int32_t len, float* __restrict acc, float* __restrict weighted,
                float* __restrict elector) {
  uint32_t exponent = 0;
  for (int32_t i = 0; i < len; ++i) {
    exponent = std::max(exponent, float_bits(x[i]) & 0x7F800000u);
    const float d = kBase ? x[i] - b[i] : x[i];
    const float s = keep_of(d, i) ? d * scale : 0.f;
    const float w = weight * s;
    if (kAcc == kMixAll) {
      acc[i] += w;
      continue;
    }
    weighted[i] = w;
    if (kUnweighted) elector[i] = s;
    const float e = kUnweighted ? s : w;
    acc[i] += kAcc == kSumSigns ? e : sign_of(e);
  }
  return exponent == 0x7F800000u;
}

// majority[i] = total[i] >= 0 ? 1 : -1 (a NaN total elects -1), in place.
void majority_pass(float* __restrict total, int32_t len) {
  for (int32_t i = 0; i < len; ++i) total[i] = total[i] >= 0.f ? 1.f : -1.f;
}

// One model's share of the election. sign(e) == majority is tested as e * majority > 0: the product is exact
// (majority is +-1) and is positive exactly when e is nonzero with the majority's sign (never for 0 or NaN).
// kSame: the elector is the weighted value itself (weighted sign source).
template <bool kSame>
void elect_pass(const float* __restrict majority, const float* __restrict elector,
                const float* __restrict weighted, float term, int32_t len, float* __restrict mixed,
                float* __restrict div) {
  for (int32_t i = 0; i < len; ++i) {
    const float w = weighted[i];
    const bool agree = (kSame ? w : elector[i]) * majority[i] > 0.f;
    mixed[i] += agree ? w : 0.f;
    div[i] += agree ? term : 0.f;
  }
}

enum Normalize : int { kKeepScale = 0, kByStatic = 1, kByAgreeing = 2 };

// out = base + lambda * (mixed / div).
template <int kNormalize, bool kLambda, bool kBase>
void finish_pass(const float* __restrict mixed, const float* __restrict div, float static_div, float lambda,
                 const float* __restrict b, int32_t len, float* __restrict out) {
  for (int32_t i = 0; i < len; ++i) {
    float v = mixed[i];
    if (kNormalize == kByStatic) v = v / static_div;
    if (kNormalize == kByAgreeing) v = v / (div[i] == 0.f ? 1.f : div[i]);
    if (kLambda) v = lambda * v;
    if (kBase) v = b[i] + v;
    out[i] = v;
  }
}

// bad[i] |= x[i] is NaN/Inf
void flag_nonfinite(const float* __restrict x, int32_t len, uint8_t* __restrict bad) {
  for (int32_t i = 0; i < len; ++i) bad[i] |= nonfinite(x[i]);
}

struct MergePlan {
  const DeltaInputs* in;
  std::vector<KeepRule> rules;
  MergeParams p;
};

// merge_element's first loop over models for a chunk (acc = mixed or the election total; weighted and electors
// kept for the election). Returns whether an input of the chunk is NaN/Inf.
bool accumulate_models(const MergePlan& plan, int64_t start, int64_t len, const float* b, MergeScratch& s) {
  const DeltaInputs& in = *plan.in;
  const MergeParams& p = plan.p;
  bool nonfinite_input = b != nullptr && max_exponent(b, static_cast<int32_t>(len)) == 0x7F800000u;
  std::fill(s.acc(), s.acc() + len, 0.f);
  const int accumulate = p.consensus == kNoConsensus ? kMixAll : p.consensus == kSum ? kSumSigns : kCountSigns;
  for (int m = 0; m < p.n; ++m) {
    const float* x = in.models[m].load(start, len, s.x());
    const uint8_t* u = draw_keep(plan.rules[m], start, len, s.drawn());
    with_bool(b != nullptr, [&](auto has_base) {
      with_keep_kind(plan.rules[m].kind, [&](auto kind) {
        const KeepTest<decltype(kind)::value> keep_of(plan.rules[m], start, len, u);
        auto run = [&](auto acc_kind, auto unweighted) {
          nonfinite_input |= model_pass<decltype(has_base)::value, decltype(kind)::value, decltype(acc_kind)::value,
                                        decltype(unweighted)::value>(x, b, keep_of, p.scales[m], p.weights[m],
                                                                     static_cast<int32_t>(len), s.acc(),
                                                                     s.weighted(m), s.elector(m));
        };
        const bool unweighted = p.sign_source == kUnweighted;
        if (accumulate == kMixAll) {
          run(std::integral_constant<int, kMixAll>{}, std::false_type{});
        } else if (accumulate == kSumSigns) {
          with_bool(unweighted, [&](auto uw) { run(std::integral_constant<int, kSumSigns>{}, uw); });
        } else {
          with_bool(unweighted, [&](auto uw) { run(std::integral_constant<int, kCountSigns>{}, uw); });
        }
      });
    });
  }
  return nonfinite_input;
}

// The sign election over all models: s.mixed() and s.divisor() from the total in s.acc() (then the majority).
void elect(const MergeParams& p, int64_t len, MergeScratch& s) {
  const int32_t n32 = static_cast<int32_t>(len);
  majority_pass(s.acc(), n32);
  std::fill(s.mixed(), s.mixed() + len, 0.f);
  std::fill(s.divisor(), s.divisor() + len, 0.f);
  for (int m = 0; m < p.n; ++m) {
    const float term = p.divisor == kWeights ? p.weights[m] : 1.f;
    if (p.sign_source == kUnweighted) {
      elect_pass<false>(s.acc(), s.elector(m), s.weighted(m), term, n32, s.mixed(), s.divisor());
    } else {
      elect_pass<true>(s.acc(), nullptr, s.weighted(m), term, n32, s.mixed(), s.divisor());
    }
  }
}

// out = base + lambda * mixed / divisor.
void finish(const MergeParams& p, const float* mixed, const float* div, const float* b, int64_t len, float* out) {
  const int normalize = !p.normalize ? kKeepScale : p.consensus == kNoConsensus ? kByStatic : kByAgreeing;
  with_bool(p.lambda != 1.f, [&](auto scaled) {
    with_bool(b != nullptr, [&](auto has_base) {
      auto run = [&](auto norm) {
        finish_pass<decltype(norm)::value, decltype(scaled)::value, decltype(has_base)::value>(
            mixed, div, p.static_divisor, p.lambda, b, static_cast<int32_t>(len), out);
      };
      if (normalize == kKeepScale) {
        run(std::integral_constant<int, kKeepScale>{});
      } else if (normalize == kByStatic) {
        run(std::integral_constant<int, kByStatic>{});
      } else {
        run(std::integral_constant<int, kByAgreeing>{});
      }
    });
  });
}

// The rare chunk with a NaN/Inf input: out[i] = NaN where an input is non-finite at i but out[i] is finite.
void poison_nonfinite(const DeltaInputs& in, int64_t start, int64_t len, const float* b, float* scratch,
                      uint8_t* bad, float* out) {
  const int32_t n32 = static_cast<int32_t>(len);
  std::memset(bad, 0, len);
  if (b != nullptr) flag_nonfinite(b, n32, bad);
  for (int m = 0; m < in.n(); ++m) flag_nonfinite(in.models[m].load(start, len, scratch), n32, bad);
  for (int32_t i = 0; i < n32; ++i) {
    if (bad[i] && !nonfinite(out[i])) out[i] = quiet_nan();
  }
}

#if defined(PK_AVX512)
// ------------------------------------------------------------------------------------------------------------
// The merge of 16 elements at a time with every model's values in registers: one pass over the slice instead
// of a dozen over its buffers. The same float32 operations as merge_element in the same order (a model that
// does not agree adds +0.f, as the scalar loops do, which keeps the sign of a zero sum), so bit-identical.

// Model m's keep decisions for the 16 elements at slice offset i (d: their task-vector values).
struct VectorKeep {
  int kind = KeepRule::kAll;
  const uint16_t* words = nullptr;  // kRandom: 16 decisions per word
  uint32_t key = 0, key_b = 0;
  int32_t last = -1, last_b = -1;

  // above(key, last) of KeepTest: mkey > key, or mkey == key at a slice index <= last.
  static __mmask16 above(__m512i k, uint32_t key, int32_t last, int32_t i) {
    const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(i), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                   10, 11, 12, 13, 14, 15));
    const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(key));
    return _mm512_cmpgt_epu32_mask(k, kv) |
           (_mm512_cmpeq_epu32_mask(k, kv) & _mm512_cmple_epi32_mask(index, _mm512_set1_epi32(last)));
  }

  __mmask16 operator()(__m512 d, int32_t i) const {
    switch (kind) {
      case KeepRule::kAll:
        return 0xFFFF;
      case KeepRule::kNone:
        return 0;
      case KeepRule::kRandom:
        return words[i / 16];
      default: {
        const __m512i k = _mm512_min_epu32(_mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF)),
                                           _mm512_set1_epi32(static_cast<int32_t>(kNanKey)));
        const __mmask16 a = above(k, key, last, i);
        return kind == KeepRule::kThreshold ? a : static_cast<__mmask16>(a & ~above(k, key_b, last_b, i));
      }
    }
  }
};

VectorKeep vector_keep(const KeepRule& rule, int64_t start, int64_t len, uint16_t* scratch) {
  VectorKeep k;
  k.kind = rule.kind;
  k.key = rule.key;
  k.key_b = rule.key_b;
  k.last = chunk_last(rule.cutoff, start, len);
  k.last_b = chunk_last(rule.cutoff_b, start, len);
  if (rule.kind == KeepRule::kRandom) k.words = keep_words(rule, start, len, scratch);
  return k;
}

inline __m512 vector_sign(__m512 x) {  // sign_of: +1, -1, or 0 (zero and NaN)
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 positive = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), one);
  return _mm512_mask_mov_ps(positive, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(-1.f));
}

// out[i] for i < len16 (a multiple of 16); returns whether an input is NaN/Inf there.
template <int kAcc, bool kUnweighted, int kNormalize, bool kLambda, bool kBase>
bool merge_vectors(const MergeParams& p, const float* b, const float* const* x, const VectorKeep* keep,
                   int32_t len16, float* out) {
  const int n = p.n;
  const __m512i exponent_bits = _mm512_set1_epi32(0x7F800000);
  __m512i exponent = _mm512_setzero_si512();
  __m512 weighted[kMaxModels], elector[kMaxModels];
  for (int32_t i = 0; i < len16; i += 16) {
    const __m512 bv = kBase ? _mm512_loadu_ps(b + i) : _mm512_setzero_ps();
    if (kBase) exponent = _mm512_max_epu32(exponent, _mm512_and_si512(_mm512_castps_si512(bv), exponent_bits));
    __m512 acc = _mm512_setzero_ps();
    for (int m = 0; m < n; ++m) {
      const __m512 xv = _mm512_loadu_ps(x[m] + i);
      exponent = _mm512_max_epu32(exponent, _mm512_and_si512(_mm512_castps_si512(xv), exponent_bits));
      const __m512 d = kBase ? _mm512_sub_ps(xv, bv) : xv;
      const __m512 sv = _mm512_maskz_mul_ps(keep[m](d, i), d, _mm512_set1_ps(p.scales[m]));
      const __m512 w = _mm512_mul_ps(_mm512_set1_ps(p.weights[m]), sv);
      if (kAcc == kMixAll) {
        acc = _mm512_add_ps(acc, w);
        continue;
      }
      const __m512 e = kUnweighted ? sv : w;
      weighted[m] = w;
      elector[m] = e;
      acc = _mm512_add_ps(acc, kAcc == kSumSigns ? e : vector_sign(e));
    }
    __m512 v = acc, div = _mm512_setzero_ps();
    if (kAcc != kMixAll) {
      const __m512 majority = _mm512_mask_mov_ps(_mm512_set1_ps(-1.f),
                                                 _mm512_cmp_ps_mask(acc, _mm512_setzero_ps(), _CMP_GE_OQ),
                                                 _mm512_set1_ps(1.f));
      v = _mm512_setzero_ps();
      for (int m = 0; m < n; ++m) {
        const __mmask16 agree =
            _mm512_cmp_ps_mask(_mm512_mul_ps(elector[m], majority), _mm512_setzero_ps(), _CMP_GT_OQ);
        const float term = p.divisor == kWeights ? p.weights[m] : 1.f;
        v = _mm512_add_ps(v, _mm512_maskz_mov_ps(agree, weighted[m]));
        div = _mm512_add_ps(div, _mm512_maskz_mov_ps(agree, _mm512_set1_ps(term)));
      }
    }
    if (kNormalize == kByStatic) v = _mm512_div_ps(v, _mm512_set1_ps(p.static_divisor));
    if (kNormalize == kByAgreeing) {
      const __mmask16 none = _mm512_cmp_ps_mask(div, _mm512_setzero_ps(), _CMP_EQ_OQ);
      v = _mm512_div_ps(v, _mm512_mask_mov_ps(div, none, _mm512_set1_ps(1.f)));
    }
    if (kLambda) v = _mm512_mul_ps(_mm512_set1_ps(p.lambda), v);
    if (kBase) v = _mm512_add_ps(bv, v);
    _mm512_storeu_ps(out + i, v);
  }
  return _mm512_reduce_max_epu32(exponent) == 0x7F800000u;
}

// merge_vectors with the runtime settings of `p` dispatched to template arguments.
bool merge_vectors_for(const MergeParams& p, const float* b, const float* const* x, const VectorKeep* keep,
                       int32_t len16, float* out) {
  const int accumulate = p.consensus == kNoConsensus ? kMixAll : p.consensus == kSum ? kSumSigns : kCountSigns;
  const int normalize = !p.normalize ? kKeepScale : p.consensus == kNoConsensus ? kByStatic : kByAgreeing;
  bool nonfinite = false;
  auto run = [&](auto acc, auto unweighted, auto norm, auto lambda, auto base) {
    nonfinite = merge_vectors<decltype(acc)::value, decltype(unweighted)::value, decltype(norm)::value,
                              decltype(lambda)::value, decltype(base)::value>(p, b, x, keep, len16, out);
  };
  auto with_normalize = [&](auto acc, auto unweighted) {
    with_bool(p.lambda != 1.f, [&](auto lambda) {
      with_bool(b != nullptr, [&](auto base) {
        if (normalize == kKeepScale) {
          run(acc, unweighted, std::integral_constant<int, kKeepScale>{}, lambda, base);
        } else if (normalize == kByStatic) {
          run(acc, unweighted, std::integral_constant<int, kByStatic>{}, lambda, base);
        } else {
          run(acc, unweighted, std::integral_constant<int, kByAgreeing>{}, lambda, base);
        }
      });
    });
  };
  if (accumulate == kMixAll) {
    with_normalize(std::integral_constant<int, kMixAll>{}, std::false_type{});
  } else {
    with_bool(p.sign_source == kUnweighted, [&](auto unweighted) {
      if (accumulate == kSumSigns) {
        with_normalize(std::integral_constant<int, kSumSigns>{}, unweighted);
      } else {
        with_normalize(std::integral_constant<int, kCountSigns>{}, unweighted);
      }
    });
  }
  return nonfinite;
}
#endif

void merge_chunk_buffers(const MergePlan& plan, int64_t start, int64_t len, MergeScratch& s, const Sink& sink,
                         float* out_fp32);

// The merge of one slice: 16 elements at a time in registers (AVX-512), the rest through the buffer passes.
void merge_chunk(const MergePlan& plan, int64_t start, int64_t len, MergeScratch& s, const Sink& sink,
                 float* out_fp32) {
  int64_t len16 = 0;
#if defined(PK_AVX512)
  len16 = len & ~int64_t(15);
  if (len16 > 0) {
    const int n = plan.p.n;
    const float* b = plan.in->load_base(start, len16, s.base());
    const float* x[kMaxModels];
    VectorKeep keep[kMaxModels];
    for (int m = 0; m < n; ++m) {
      x[m] = plan.in->models[m].load(start, len16, s.weighted(m));
      keep[m] = vector_keep(plan.rules[m], start, len16, reinterpret_cast<uint16_t*>(s.elector(m)));
    }
    float* out = out_fp32 != nullptr ? out_fp32 + start : s.x();
    if (merge_vectors_for(plan.p, b, x, keep, static_cast<int32_t>(len16), out)) {
      poison_nonfinite(*plan.in, start, len16, b, s.spare(), s.bad.data(), out);
    }
    if (out_fp32 == nullptr) sink.store(start, len16, out);
  }
#endif
  if (len16 < len) merge_chunk_buffers(plan, start + len16, len - len16, s, sink, out_fp32);
}

// The merge of one slice through per-model buffer passes (vectorised by the compiler).
void merge_chunk_buffers(const MergePlan& plan, int64_t start, int64_t len, MergeScratch& s, const Sink& sink,
                         float* out_fp32) {
  const float* b = plan.in->load_base(start, len, s.base());
  const bool nonfinite_input = accumulate_models(plan, start, len, b, s);
  const float* mixed = s.acc();
  if (plan.p.consensus != kNoConsensus) {
    elect(plan.p, len, s);
    mixed = s.mixed();
  }
  // fp32 output is written in place; other dtypes go through a buffer and a conversion.
  float* out = out_fp32 != nullptr ? out_fp32 + start : s.x();
  finish(plan.p, mixed, s.divisor(), b, len, out);
  if (nonfinite_input) poison_nonfinite(*plan.in, start, len, b, s.spare(), s.bad.data(), out);
  if (out_fp32 == nullptr) sink.store(start, len, out);
}

// The merge parameters of fused_merge / fused_merge_l1, checked; `scales` and `weights` must outlive the result.
MergeParams merge_params(const DeltaInputs& in, const float* scales, const std::vector<float>& weights,
                         int64_t sign_source, int64_t consensus, int64_t divisor, bool normalize, double lambda,
                         const char* op) {
  const int n = in.n();
  TORCH_CHECK(static_cast<int>(weights.size()) == n, op, ": weights must have ", n, " entries (got ",
              weights.size(), ")");
  TORCH_CHECK(sign_source == 0 || sign_source == 1, op, ": sign_source must be 0 or 1 (got ", sign_source, ")");
  TORCH_CHECK(consensus >= 0 && consensus <= 2, op, ": consensus must be 0, 1 or 2 (got ", consensus, ")");
  TORCH_CHECK(divisor == 0 || divisor == 1, op, ": divisor must be 0 or 1 (got ", divisor, ")");
  MergeParams p;
  p.n = n;
  p.weights = weights.data();
  p.scales = scales;
  p.sign_source = static_cast<int>(sign_source);
  p.consensus = static_cast<int>(consensus);
  p.divisor = static_cast<int>(divisor);
  p.normalize = normalize;
  p.lambda = static_cast<float>(lambda);
  p.static_divisor = static_divisor(n, p.weights, p.divisor);
  p.has_base = in.has_base;
  return p;
}

// The merge pass works on slices of a chunk: its dozen per-model and election buffers then stay in L1.
constexpr int64_t kMergeSlice = 1024;

// The merge pass over every chunk, into a new tensor shaped like `like`.
at::Tensor merge_all(const MergePlan& plan, const at::Tensor& like, at::ScalarType out_dtype) {
  static RetainedBlock& retained = *new RetainedBlock;  // never destroyed: outputs may outlive static destructors
  const bool direct = is_supported_float(out_dtype);
  at::Tensor out = retained.empty(like.sizes(), direct ? out_dtype : at::kFloat);
  const Sink sink(out);
  float* out_fp32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  const int64_t numel = plan.in->numel;
  parallel_blocks(numel, [&](int64_t first, int64_t end) {
    MergeScratch scratch(plan.p.n);
    for (int64_t block = first; block < end; ++block) {
      for_chunks_of_block(numel, block, [&](int64_t start, int64_t len) {
        for (int64_t done = 0; done < len; done += kMergeSlice) {
          const int64_t next = start + done + kMergeSlice;
          if (next < numel) prefetch_inputs(*plan.in, next, std::min(kMergeSlice, numel - next));
          merge_chunk(plan, start + done, std::min(kMergeSlice, len - done), scratch, sink, out_fp32);
        }
      });
    }
  });
  return direct ? out : out.to(out_dtype);
}

at::Tensor fused_merge(const c10::optional<at::Tensor>& base, at::TensorList tensors, int64_t sparsifier,
                       const at::Tensor& thresholds, at::ArrayRef<double> keep_probs, int64_t seed,
                       const at::Tensor& scales, at::ArrayRef<double> weights, int64_t sign_source,
                       int64_t consensus, int64_t divisor, bool normalize, double lambda, at::ScalarType out_dtype) {
  const char* op = "pykernels::fused_merge";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const int n = in.n();
  std::vector<KeepRule> rules = keep_rules(n, sparsifier, thresholds, keep_probs, seed, op);
  TORCH_CHECK(scales.numel() == n, op, ": scales must have ", n, " entries (got ", scales.numel(), ")");
  const at::Tensor scale_values = scales.to(at::kCPU, at::kFloat).contiguous();
  const std::vector<float> weight_values(weights.begin(), weights.end());  // float32(w), as the reference
  const MergePlan plan{&in, std::move(rules),
                       merge_params(in, scale_values.data_ptr<float>(), weight_values, sign_source, consensus,
                                    divisor, normalize, lambda, op)};
  return merge_all(plan, tensors[0], out_dtype);
}

// merging._l1_ratio: sum|d| / sum|kept d| in float64, rounded to float32; 1 when either sum is below 1e-7.
float l1_scale(double all, double kept) {
  return (all < 1e-7 || kept < 1e-7) ? 1.f : static_cast<float>(all / kept);
}

// fused_merge with scales = the l1 ratios of delta_l1_norms, in two passes over the data. Random keep decisions
// are drawn once, in the norm pass, and kept packed (numel / 8 bytes per random model) for the merge pass: the
// Philox draws cost more than everything else both passes do.
at::Tensor fused_merge_l1(const c10::optional<at::Tensor>& base, at::TensorList tensors, int64_t sparsifier,
                          const at::Tensor& thresholds, at::ArrayRef<double> keep_probs, int64_t seed,
                          at::ArrayRef<double> weights, int64_t sign_source, int64_t consensus, int64_t divisor,
                          bool normalize, double lambda, at::ScalarType out_dtype) {
  const char* op = "pykernels::fused_merge_l1";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const int n = in.n();
  std::vector<KeepRule> rules = keep_rules(n, sparsifier, thresholds, keep_probs, seed, op);
  static RetainedBlock& retained = *new RetainedBlock;
  const int64_t words = (in.numel + 15) / 16;
  int random_models = 0;
  for (const KeepRule& r : rules) random_models += r.kind == KeepRule::kRandom;
  const at::Tensor packed = retained.empty({random_models, words}, at::kShort);
  std::vector<uint16_t*> record(n, nullptr);
  for (int m = 0, slot = 0; m < n; ++m) {
    if (rules[m].kind == KeepRule::kRandom) record[m] = reinterpret_cast<uint16_t*>(packed[slot++].data_ptr());
  }
  const std::vector<double> norms = l1_norms(in, rules, record.data());
  std::vector<float> scales(n);
  for (int m = 0; m < n; ++m) {
    scales[m] = l1_scale(norms[2 * m], norms[2 * m + 1]);
    rules[m].bits = record[m];
  }
  const std::vector<float> weight_values(weights.begin(), weights.end());
  const MergePlan plan{&in, std::move(rules),
                       merge_params(in, scales.data(), weight_values, sign_source, consensus, divisor, normalize,
                                    lambda, op)};
  return merge_all(plan, tensors[0], out_dtype);
}

// ------------------------------------------------------------------------------------------------------------

// The same tensor listed more than once (the band sparsifier asks for two top-k sizes of every task vector in one
// call): same data, dtype and strides.
bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() && a.strides() == b.strides() &&
         a.sizes() == b.sizes() && a.device() == b.device();
}

// topk_thresholds (cpu/radix_select.h) of rows r = (model_of[r], ks[r]) where several rows may select from the same
// model: pass 1 (the top-16-bit histogram) is computed once per distinct model and shared by its rows; passes 2 and
// 3 run per row, all rows sharing each pass over the data.
at::Tensor topk_thresholds_of_rows(const DeltaInputs& in, const std::vector<int>& model_of,
                                   const std::vector<int64_t>& ks) {
  const int rows_n = static_cast<int>(ks.size());
  at::Tensor out = at::empty({rows_n, 2}, at::kLong);
  auto rows = out.accessor<int64_t, 2>();
  std::vector<ModelSelect> sel;
  std::vector<int> row_of;  // sel entry -> output row
  for (int r = 0; r < rows_n; ++r) {
    rows[r][0] = kKeepNone;
    rows[r][1] = -1;
    if (ks[r] > 0) {
      sel.push_back(ModelSelect{model_of[r], ks[r]});
      row_of.push_back(r);
    }
  }
  if (sel.empty()) return out;

  {
    std::vector<ModelSelect> distinct;  // one entry per model, for pass 1
    std::vector<size_t> slot(sel.size());
    for (size_t s = 0; s < sel.size(); ++s) {
      size_t u = 0;
      while (u < distinct.size() && distinct[u].model != sel[s].model) ++u;
      if (u == distinct.size()) distinct.push_back(ModelSelect{sel[s].model, 0});
      slot[s] = u;
    }
    const ThreadScratch scratch(kTotalSlot, distinct.size() * kHighBins * sizeof(int64_t));
    int64_t* high = scratch.zeroed<int64_t>(distinct.size() * kHighBins);
    high_histograms(in, distinct, high);
    for (size_t s = 0; s < sel.size(); ++s) {
      sel[s].high = bin_of_rank(high + slot[s] * kHighBins, kHighBins, sel[s].rank);
    }
  }

  std::vector<size_t> cut_of;  // sel entries whose cutoff needs pass 3
  std::vector<ModelSelect> cut;
  {
    const ThreadScratch scratch(kTotalSlot, sel.size() * kLowBins * sizeof(int64_t));
    int64_t* low = scratch.zeroed<int64_t>(sel.size() * kLowBins);
    BucketMembers members = low_histograms(in, sel, low);
    for (size_t s = 0; s < sel.size(); ++s) {
      const uint32_t bin = bin_of_rank(low + s * kLowBins, kLowBins, sel[s].rank);
      sel[s].key = (sel[s].high << 16) | bin;
      if (members.complete[s]) {
        sel[s].cutoff = cut_from_members(members.lists[s], bin, sel[s].rank);
      } else {
        cut.push_back(sel[s]);
        cut_of.push_back(s);
      }
    }
  }
  if (!cut.empty()) locate_cut_ties(in, cut);
  for (size_t c = 0; c < cut.size(); ++c) sel[cut_of[c]].cutoff = cut[c].cutoff;
  for (size_t s = 0; s < sel.size(); ++s) {
    rows[row_of[s]][0] = sel[s].key;
    rows[row_of[s]][1] = sel[s].cutoff;
  }
  return out;
}

at::Tensor delta_topk_thresholds(const c10::optional<at::Tensor>& base, at::TensorList tensors,
                                 at::IntArrayRef ks) {
  const char* op = "pykernels::delta_topk_thresholds";
  TORCH_CHECK(ks.size() == tensors.size(), op, ": ks must have one entry per model (", tensors.size(), "), got ",
              ks.size());
  // Each distinct tensor is read (and made contiguous) once per pass, however often it is listed.
  std::vector<at::Tensor> distinct;
  std::vector<int> model_of(tensors.size());
  for (size_t m = 0; m < tensors.size(); ++m) {
    size_t u = 0;
    while (u < distinct.size() && !same_tensor(distinct[u], tensors[m])) ++u;
    if (u == distinct.size()) distinct.push_back(tensors[m]);
    model_of[m] = static_cast<int>(u);
  }
  TORCH_CHECK(tensors.size() <= static_cast<size_t>(kMaxModels), op, ": at most ", kMaxModels,
              " models are supported (got ", tensors.size(), ")");
  const DeltaInputs in = [&]() -> DeltaInputs {
    if (distinct.size() == tensors.size()) return make_delta_inputs(base, tensors, op);
    try {
      return make_delta_inputs(base, distinct, op);
    } catch (const c10::Error&) {
      make_delta_inputs(base, tensors, op);  // the same error, naming the tensor by its index in `tensors`
      throw;
    }
  }();
  for (size_t m = 0; m < ks.size(); ++m) {
    TORCH_CHECK(ks[m] >= 0 && ks[m] <= in.numel, op, ": ks[", m, "] = ", ks[m], " is outside [0, ", in.numel, "]");
  }
  const std::vector<int64_t> k(ks.begin(), ks.end());
  return distinct.size() == tensors.size() ? topk_thresholds(in, k) : topk_thresholds_of_rows(in, model_of, k);
}

at::Tensor philox_uniform_op(int64_t seed, int64_t offset, int64_t n) {
  TORCH_CHECK(n >= 0, "pykernels::philox_uniform: n must be >= 0 (got ", n, ")");
  at::Tensor out = at::empty({n}, at::kFloat);
  float* values = out.data_ptr<float>();
  at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) {
    philox_uniform_fill(static_cast<uint64_t>(seed), offset + begin, end - begin, values + begin);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("delta_topk_thresholds", &delta_topk_thresholds);
  m.impl("delta_l1_norms", &delta_l1_norms);
  m.impl("fused_merge", &fused_merge);
  m.impl("fused_merge_l1", &fused_merge_l1);
}

// philox_uniform has no tensor argument, so the dispatcher cannot select a backend key for it: it reaches only a
// CompositeExplicitAutograd kernel (the one used for an empty dispatch key set). Its result is a CPU tensor.
TORCH_LIBRARY_IMPL(pykernels, CompositeExplicitAutograd, m) { m.impl("philox_uniform", &philox_uniform_op); }

}  // namespace cpu
}  // namespace pykernels
