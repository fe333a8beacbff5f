// Per-element math of the fused merge (reference: pykernels/reference/merging.py::fused_merge), shared by
// the CPU and CUDA kernels. Everything is float32, models are visited in order, nothing is contracted to FMA.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace pykernels {

constexpr int kMaxModels = 64;
constexpr uint32_t kNanKey = 0x7F800001u;
constexpr int64_t kKeepNone = int64_t(1) << 32;  // magnitude threshold above every key: keep nothing

enum Sparsifier : int { kNoSparsify = 0, kMagnitude = 1, kRandom = 2, kBand = 3 };

// Columns of the int64 (n, columns) thresholds a sparsifier reads: (key, cutoff) for kMagnitude,
// (key_a, cutoff_a, key_b, cutoff_b) for kBand; 0 for sparsifiers without thresholds.
PK_HD int threshold_columns(int sparsifier) {
  return sparsifier == kMagnitude ? 2 : sparsifier == kBand ? 4 : 0;
}
enum SignSource : int { kWeighted = 0, kUnweighted = 1 };
enum Consensus : int { kNoConsensus = 0, kSum = 1, kCount = 2 };
enum Divisor : int { kWeights = 0, kModelCount = 1 };  // kCount would clash with Consensus::kCount

// Order-preserving key of |x|: -0 == +0, every NaN one key above +inf (payloads differ between CPU and GPU).
PK_HD uint32_t magnitude_key(float x) {
  union {
    float f;
    uint32_t u;
  } v{x};
  const uint32_t key = v.u & 0x7FFFFFFFu;
  return key < kNanKey ? key : kNanKey;
}

// Exact magnitude top-k membership: (key, cutoff) from delta_topk_thresholds.
PK_HD bool keep_by_threshold(float d, int64_t index, int64_t key, int64_t cutoff) {
  const int64_t k = magnitude_key(d);
  return k > key || (k == key && index <= cutoff);
}

// Band membership (breadcrumbs, mergekit's magnitude_outliers): in the top-k of (key_a, cutoff_a) but not in
// the top-k of (key_b, cutoff_b), i.e. above(a) && !above(b) with above = keep_by_threshold.
PK_HD bool keep_by_band(float d, int64_t index, int64_t key_a, int64_t cutoff_a, int64_t key_b, int64_t cutoff_b) {
  const int64_t k = magnitude_key(d);
  const bool above_a = k > key_a || (k == key_a && index <= cutoff_a);
  const bool above_b = k > key_b || (k == key_b && index <= cutoff_b);
  return above_a && !above_b;
}

PK_HD float sign_of(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }  // torch.sign (NaN -> 0)

PK_HD bool is_finite(float x) { return magnitude_key(x) < 0x7F800000u; }

PK_HD float quiet_nan() {
  union {
    uint32_t u;
    float f;
  } v{0x7FC00000u};
  return v.f;
}

struct MergeParams {
  int n;                // number of models
  const float* weights;  // (n,)
  const float* scales;   // (n,) multiplier of kept values (1, 1/p or l1 ratio)
  int sign_source;
  int consensus;
  int divisor;
  bool normalize;
  float lambda;
  float static_divisor;  // divisor when consensus is none (sum of weights or n), already guarded
  bool has_base;
};

// Divisor used when there is no sign consensus: the float32 sum of the weights in order (|sum| < 1e-8 -> 1),
// or the number of models.
PK_HD float static_divisor(int n, const float* weights, int divisor) {
  if (divisor == kModelCount) return static_cast<float>(n);
  float total = 0.f;
  for (int m = 0; m < n; ++m) total += weights[m];
  return (total < 1e-8f && total > -1e-8f) ? 1.f : total;
}

// d[m]: float32 task vector of model m at this element; keep[m]: its sparsifier mask.
// nonfinite_input: any input (base or model) is NaN/Inf here; the result is then never a finite number.
PK_HD float merge_element(const MergeParams& p, const float* d, const bool* keep, float base,
                          bool nonfinite_input) {
  float weighted[kMaxModels];
  float elector[kMaxModels];
  for (int m = 0; m < p.n; ++m) {
    const float s = keep[m] ? d[m] * p.scales[m] : 0.f;
    weighted[m] = p.weights[m] * s;
    elector[m] = p.sign_source == kWeighted ? weighted[m] : s;
  }
  float mixed = 0.f;
  float div = p.static_divisor;
  if (p.consensus == kNoConsensus) {
    for (int m = 0; m < p.n; ++m) mixed += weighted[m];
  } else {
    float total = 0.f;
    for (int m = 0; m < p.n; ++m) total += p.consensus == kSum ? elector[m] : sign_of(elector[m]);
    const float majority = total >= 0.f ? 1.f : -1.f;
    div = 0.f;
    for (int m = 0; m < p.n; ++m) {
      const bool agree = sign_of(elector[m]) == majority;
      mixed += agree ? weighted[m] : 0.f;
      div += agree ? (p.divisor == kWeights ? p.weights[m] : 1.f) : 0.f;
    }
    if (div == 0.f) div = 1.f;
  }
  if (p.normalize) mixed = mixed / div;
  float out = p.lambda != 1.f ? p.lambda * mixed : mixed;
  if (p.has_base) out = base + out;
  if (nonfinite_input && is_finite(out)) out = quiet_nan();
  return out;
}

}  // namespace pykernels
