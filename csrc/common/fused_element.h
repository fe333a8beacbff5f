// Per-element building blocks of the CUDA merge kernels (csrc/cuda/merging.cu), written as PK_HD functions so
// the host tests (tests/test_cuda_host_logic.py) run exactly this code against pykernels.reference:
//   dtype codes and exact fp32/bf16/fp16 loads, round-to-nearest-even stores,
//   d_mj = float32(t_m[j]) - float32(base[j]) loads, the sparsifier mask of one element (none, magnitude top-k,
//   random, band),
//   and one output element of the fused merge (merge_element() of common/merge_math.h).
#pragma once
#include <cstdint>

#include "common/macros.h"
#include "common/merge_math.h"
#include "common/philox.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace pykernels {

// dtype codes of raw input / output buffers
enum DTypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

PK_HD float float_from_bits(uint32_t u) {
  union {
    uint32_t u;
    float f;
  } v{u};
  return v.f;
}

PK_HD uint32_t bits_from_float(float f) {
  union {
    float f;
    uint32_t u;
  } v{f};
  return v.u;
}

PK_HD float bf16_bits_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

// Exact fp16 -> fp32 (every half is a float).
PK_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0) {
    if (man == 0) return float_from_bits(sign);
    uint32_t e = 113;  // subnormal: normalise the mantissa
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    return float_from_bits(sign | (e << 23) | ((man & 0x3FFu) << 13));
  }
  if (exp == 31) return float_from_bits(sign | 0x7F800000u | (man << 13));
  return float_from_bits(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

// fp32 -> bf16, round to nearest even (as torch's cast; NaN -> a quiet NaN).
PK_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = bits_from_float(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

// fp32 -> fp16, round to nearest even (as torch's cast; overflow -> inf, NaN -> a quiet NaN).
PK_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = bits_from_float(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u;
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                        // below 2^-14: fp16 subnormal or zero
    if (ax <= 0x33000000u) return sign;          // <= 2^-25 rounds to 0 (the tie goes to even 0)
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t s = 126 - e;  // 14..24: value in units of 2^-24 is m >> s
    uint32_t r = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t m = ax & 0x7FFFFFu;
  uint32_t r = (((ax >> 23) - 112) << 10) | (m >> 13);
  const uint32_t rem = m & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry rolls into the exponent
  return static_cast<uint16_t>(sign | r);
#endif
}

PK_HD float load_as_float(const void* p, int dtype, int64_t j) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[j];
  const uint16_t h = static_cast<const uint16_t*>(p)[j];
  return dtype == kBFloat16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}

PK_HD void store_from_float(void* p, int dtype, int64_t j, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[j] = v;
  } else {
    static_cast<uint16_t*>(p)[j] = dtype == kBFloat16 ? float_to_bf16_bits(v) : float_to_half_bits(v);
  }
}

// The inputs of every delta op: contiguous buffers, flat index j.
struct DeltaInputs {
  int n;                        // number of models, 1..kMaxModels
  int base_dtype;               // DTypeCode of base (when base != nullptr)
  int64_t numel;                // elements per tensor
  const void* base;             // may be nullptr: d = t
  const void* data[kMaxModels];
  int dtype[kMaxModels];
};

PK_HD float load_base(const DeltaInputs& in, int64_t j) {
  return in.base != nullptr ? load_as_float(in.base, in.base_dtype, j) : 0.f;
}

// d_mj given the (already loaded) base value b = load_base(in, j).
PK_HD float load_delta(const DeltaInputs& in, int m, int64_t j, float b) {
  const float t = load_as_float(in.data[m], in.dtype[m], j);
  return in.base != nullptr ? t - b : t;
}

// delta_topk_thresholds: the model whose top-16-bit histogram (pass 1) serves model m (ks: n selection sizes).
// A buffer listed more than once (the band sparsifier asks for two top-k sizes of every model in one call) is
// counted once, by its first listing with k > 0; every other model is its own owner.
inline int histogram_owner(const DeltaInputs& in, const int64_t* ks, int m) {
  for (int o = 0; o < m; ++o) {
    if (ks[o] > 0 && in.data[o] == in.data[m] && in.dtype[o] == in.dtype[m]) return o;
  }
  return m;
}

// The sparsifier of every model, as fused_merge / delta_l1_norms receive it.
struct SparsifyArgs {
  int sparsifier;               // Sparsifier code
  const int64_t* thresholds;    // (n, threshold_columns(sparsifier)) row-major: (key, cutoff) for kMagnitude,
                                // (key_a, cutoff_a, key_b, cutoff_b) for kBand; nullptr for the others
  uint64_t keep_all;            // bit m: keep_probs[m] >= 1 (random sparsifier keeps everything)
  float keep_prob[kMaxModels];  // (float)keep_probs[m]
  uint64_t seed[kMaxModels];    // model_seed(seed, m)
};

PK_HD bool keep_element(const SparsifyArgs& s, int m, float d, int64_t j) {
  if (s.sparsifier == kMagnitude) return keep_by_threshold(d, j, s.thresholds[2 * m], s.thresholds[2 * m + 1]);
  if (s.sparsifier == kBand) {
    const int64_t* t = s.thresholds + 4 * m;
    return keep_by_band(d, j, t[0], t[1], t[2], t[3]);
  }
  if (s.sparsifier == kRandom) {
    if ((s.keep_all >> m) & 1u) return true;
    return philox_uniform(s.seed[m], j) < s.keep_prob[m];
  }
  return true;
}

// Host-side construction of SparsifyArgs from the op arguments (keep_probs: n doubles, read for kRandom only;
// thresholds: the (n, threshold_columns(sparsifier)) array the kernels read, for kMagnitude and kBand only).
inline SparsifyArgs make_sparsify_args(int sparsifier, const int64_t* thresholds, const double* keep_probs,
                                       int64_t seed, int n) {
  SparsifyArgs s{};
  s.sparsifier = sparsifier;
  s.thresholds = threshold_columns(sparsifier) > 0 ? thresholds : nullptr;
  s.keep_all = 0;
  if (sparsifier == kRandom) {
    for (int m = 0; m < n; ++m) {
      if (keep_probs[m] >= 1.0) s.keep_all |= uint64_t(1) << m;
      s.keep_prob[m] = static_cast<float>(keep_probs[m]);
      s.seed[m] = model_seed(static_cast<uint64_t>(seed), m);
    }
  }
  return s;
}

// The merge settings of fused_merge as the kernel receives them (weights by value, scales by pointer).
struct MergeSettings {
  const float* scales;  // (n,) float32, readable where the kernel runs
  float weights[kMaxModels];
  int sign_source;
  int consensus;
  int divisor;
  bool normalize;
  float lambda;
};

// The MergeParams of merge_element(); `weights` must outlive the result (it points into s).
PK_HD MergeParams merge_params_of(const MergeSettings& s, int n, bool has_base) {
  MergeParams p;
  p.n = n;
  p.weights = s.weights;
  p.scales = s.scales;
  p.sign_source = s.sign_source;
  p.consensus = s.consensus;
  p.divisor = s.divisor;
  p.normalize = s.normalize;
  p.lambda = s.lambda;
  p.static_divisor = static_divisor(n, s.weights, s.divisor);
  p.has_base = has_base;
  return p;
}

// One output element of fused_merge (before the cast to out_dtype). p.n == in.n, p.has_base == (in.base != 0).
PK_HD float fused_merge_element(const DeltaInputs& in, const SparsifyArgs& s, const MergeParams& p, int64_t j) {
  float d[kMaxModels];
  bool keep[kMaxModels];
  const float b = load_base(in, j);
  bool nonfinite = in.base != nullptr && !is_finite(b);
  for (int m = 0; m < in.n; ++m) {
    const float t = load_as_float(in.data[m], in.dtype[m], j);
    nonfinite = nonfinite || !is_finite(t);
    d[m] = in.base != nullptr ? t - b : t;
    keep[m] = keep_element(s, m, d[m], j);
  }
  return merge_element(p, d, keep, b, nonfinite);
}

}  // namespace pykernels
