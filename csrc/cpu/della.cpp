// CPU kernels of DELLA (docs/PRIMITIVES.md "DELLA"; reference: pykernels/reference/della.py):
// della_l1_norms and della_merge, each ONE streaming pass over the inputs, fused per row.
//
// The inputs are read in their ranking layout: rows = numel / n rows of n = shape[-1] elements (0-d: one row of
// 1); element (row, col) has the flat index i = row * n + col, its Philox counter. Rows are independent, so
// threads take whole rows. For each row and each model m the kernel
//   1. loads x_m (and the base) as float32 and forms d = x_m - base (float32),
//   2. ranks |d| within the row: magnitude keys (NaN above +inf), stable LSD radix order (row_sort.h), so equal
//      keys rank by ascending index, exactly reference.selection.row_rank,
//   3. p = lo + step * float32(r - 1) (a float32 multiply then a float32 add; the build uses -ffp-contract=off,
//      so this is never an FMA) and keep = philox_uniform(model_seed(seed, m), i) < p (philox_simd.h),
//   4. replaces d by the model's sparsified value s = keep ? (inverse ? d / p : d) * scales[m] : 0 in the thread's
//      row buffer of model m;
// then combines the N rows with the float32 operations of merge_element() (common/merge_math.h, the per-element
// combination of fused_merge) in the same order, pass by pass over the row, and writes the output row. Every
// element sees the float32 operations of the reference in the same order, so the output is bit-identical to it
// for any thread count.
//
// Shortcuts that do not change a single bit: a model with density >= 1 keeps everything (p = 1, d / 1 = d), one
// with density <= 0 nothing; a model with step == 0 (epsilon 0, or n == 1) has p = lo at every rank, so its row
// is not ranked (p is only used where it is > 0, i.e. where something is kept, and lo + 0 == lo there).
//
// Extra memory: the output, plus per-thread row buffers of about (4 N + 60) bytes per element of a row (N models).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/merge_math.h"
#include "common/philox.h"
#include "cpu/chunk_io.h"
#include "cpu/philox_simd.h"
#include "cpu/row_sort.h"

namespace pykernels {
namespace cpu {

namespace {

// How model m's keep mask is decided, with the degenerate densities resolved once per call.
struct DellaRule {
  enum Kind { kAll, kNone, kRandom } kind = kAll;
  uint64_t seed = 0;  // model_seed(seed, m)
  float lo = 1.f;     // float32(rho - eps)
  float step = 0.f;   // float32(2 eps / (n - 1)), 0 when n == 1
};

std::vector<DellaRule> della_rules(int models, int64_t n, at::ArrayRef<double> densities,
                                   at::ArrayRef<double> epsilons, int64_t seed, const char* op) {
  TORCH_CHECK(static_cast<int>(densities.size()) == models, op, ": densities must have ", models,
              " entries (got ", densities.size(), ")");
  TORCH_CHECK(static_cast<int>(epsilons.size()) == models, op, ": epsilons must have ", models, " entries (got ",
              epsilons.size(), ")");
  std::vector<DellaRule> rules(models);
  for (int m = 0; m < models; ++m) {
    const double rho = densities[m], eps = epsilons[m];
    if (rho >= 1.0) continue;  // kAll
    if (rho <= 0.0) {
      rules[m].kind = DellaRule::kNone;
      continue;
    }
    rules[m].kind = DellaRule::kRandom;
    rules[m].seed = model_seed(static_cast<uint64_t>(seed), m);
    rules[m].lo = static_cast<float>(rho - eps);  // computed in double, rounded once
    rules[m].step = n > 1 ? static_cast<float>(2.0 * eps / static_cast<double>(n - 1)) : 0.f;
  }
  return rules;
}

// (rows, n) of the ranking layout.
std::pair<int64_t, int64_t> row_layout(const at::Tensor& t, const char* op) {
  if (t.dim() == 0) return {1, 1};
  const int64_t n = t.size(-1);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": rows (the last dimension) must have fewer than "
              "2^31 elements (got ", n, ")");
  return {n > 0 ? t.numel() / n : 0, n};
}

inline bool nonfinite(float x) { return !(std::fabs(x) <= FLT_MAX); }  // NaN compares false

// Buffers of one thread, reused for every row it processes.
struct RowWork {
  RowWork(int models, int64_t n)
      : n(n),
        base(n),
        x(n),
        u(n),
        out(n),
        d(static_cast<size_t>(models) * n),
        keep(n),
        bad(n),
        keys(n),
        ranks(n),
        acc(n),
        mixed(n),
        div(n) {}

  float* d_of(int m) { return d.data() + static_cast<int64_t>(m) * n; }

  int64_t n;
  std::vector<float> base, x, u, out;
  std::vector<float> d;        // (models, n): d, then (merge) the sparsified values s
  std::vector<uint8_t> keep;   // the norms' keep flags
  std::vector<uint8_t> bad;    // an input is NaN/Inf at this element
  std::vector<uint32_t> keys;
  std::vector<int32_t> ranks;  // 1-based
  RowSortScratch sort;
  std::vector<float> acc, mixed, div;  // the combination (acc: mixed without consensus, else the election total)
};

// d = x - b (x without a base); bad |= x is NaN/Inf.
template <bool kBase>
void delta_row(const float* __restrict x, const float* __restrict b, int64_t n, float* __restrict d,
               uint8_t* __restrict bad) {
  for (int64_t j = 0; j < n; ++j) {
    d[j] = kBase ? x[j] - b[j] : x[j];
    bad[j] |= nonfinite(x[j]);
  }
}

// The keep decision of a row: p_j = lo + step * float32(r_j - 1) (p_j = lo without ranks), keep_j = u_j < p_j.
// kMerge: d[j] becomes model m's sparsified value s_j = keep_j ? (kInverse ? d_j / p_j : d_j) * scale : 0
// (merge_element's s); else keep[j] = keep_j (the norms).
template <bool kRanked, bool kInverse, bool kMerge>
void keep_row(const float* __restrict u, const int32_t* __restrict ranks, float lo, float step, float scale,
              int64_t n, float* __restrict d, uint8_t* __restrict keep) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = kRanked ? lo + step * static_cast<float>(ranks[j] - 1) : lo;
    const bool k = u[j] < p;
    if (kMerge) {
      const float v = kInverse ? d[j] / p : d[j];  // computed everywhere, used only where kept (p > 0)
      d[j] = k ? v * scale : 0.f;
    } else {
      keep[j] = k;
    }
  }
}

// s = d * scale (everything kept, p = 1: d / 1 == d).
void scale_row(float scale, int64_t n, float* __restrict d) {
  for (int64_t j = 0; j < n; ++j) d[j] = d[j] * scale;
}

// Model m's row starting at flat index `start`: for the merge (keep == nullptr) its sparsified values s in d;
// for the norms d and its keep flags.
void model_row(const DellaRule& rule, const float* x, const float* b, int64_t start, bool inverse, float scale,
               RowWork& w, float* d, uint8_t* keep) {
  const int64_t n = w.n;
  const bool merge = keep == nullptr;
  with_bool(b != nullptr, [&](auto has_base) { delta_row<decltype(has_base)::value>(x, b, n, d, w.bad.data()); });
  if (rule.kind == DellaRule::kAll) {
    if (merge) {
      scale_row(scale, n, d);
    } else {
      std::fill(keep, keep + n, uint8_t(1));
    }
    return;
  }
  if (rule.kind == DellaRule::kNone) {
    if (merge) {
      std::fill(d, d + n, 0.f);
    } else {
      std::fill(keep, keep + n, uint8_t(0));
    }
    return;
  }
  philox_uniform_fill(rule.seed, start, n, w.u.data());
  const bool ranked = rule.step != 0.f;
  if (ranked) {
    for (int64_t j = 0; j < n; ++j) w.keys[j] = magnitude_key(d[j]);
    stable_key_ranks(w.keys.data(), n, w.ranks.data(), w.sort);
  }
  with_bool(ranked, [&](auto r) {
    with_bool(inverse, [&](auto inv) {
      with_bool(merge, [&](auto mg) {
        keep_row<decltype(r)::value, decltype(inv)::value, decltype(mg)::value>(w.u.data(), w.ranks.data(), rule.lo,
                                                                                rule.step, scale, n, d, keep);
      });
    });
  });
}

struct Plan {
  const DeltaInputs* in;
  std::vector<DellaRule> rules;
  int64_t rows = 0, n = 0;
};

// Loads the base row (nullptr without a base) and resets the row's non-finite flags to the base's.
const float* begin_row(const Plan& plan, int64_t start, RowWork& w) {
  const float* b = plan.in->load_base(start, w.n, w.base.data());
  if (b == nullptr) {
    std::fill(w.bad.begin(), w.bad.end(), uint8_t(0));
  } else {
    for (int64_t j = 0; j < w.n; ++j) w.bad[j] = nonfinite(b[j]);
  }
  return b;
}

Plan make_plan(at::TensorList tensors, at::ArrayRef<double> densities,
               at::ArrayRef<double> epsilons, int64_t seed, const DeltaInputs& in, const char* op) {
  Plan plan;
  plan.in = &in;
  std::tie(plan.rows, plan.n) = row_layout(tensors[0], op);
  plan.rules = della_rules(in.n(), plan.n, densities, epsilons, seed, op);
  return plan;
}

// Rows per unit of parallel work (and per float64 partial sum of the norms): a fixed number, never derived
// from the thread count.
int64_t rows_per_block(int64_t n) { return std::max<int64_t>(1, kBlock / std::max<int64_t>(n, 1)); }

// ------------------------------------------------------------------------------------------------------------

// Summation order (identical for any thread count): the rows are cut into blocks of rows_per_block(n) rows; a
// block's partial sum starts at 0 and adds, row by row in order, the row's 16 lane sums of l1_chunk (lane l sums
// |d_j|, j = l mod 16, in index order) in lane order; the result is 0 + the block partials in block order.
at::Tensor della_l1_norms(const c10::optional<at::Tensor>& base, at::TensorList tensors,
                          at::ArrayRef<double> densities, at::ArrayRef<double> epsilons, int64_t seed) {
  const char* op = "pykernels::della_l1_norms";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const Plan plan = make_plan(tensors, densities, epsilons, seed, in, op);
  const int models = in.n();
  at::Tensor out = at::zeros({models, 2}, at::kDouble);
  if (plan.rows == 0) return out;
  const int64_t block_rows = rows_per_block(plan.n);
  const int64_t blocks = (plan.rows + block_rows - 1) / block_rows;
  std::vector<double> partial(static_cast<size_t>(blocks) * models * 2, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t end) {
    RowWork w(1, plan.n);
    for (int64_t block = first; block < end; ++block) {
      double* sums = partial.data() + block * models * 2;
      const int64_t row_end = std::min(plan.rows, (block + 1) * block_rows);
      for (int64_t row = block * block_rows; row < row_end; ++row) {
        const int64_t start = row * plan.n;
        const float* b = begin_row(plan, start, w);
        for (int m = 0; m < models; ++m) {
          const float* x = in.models[m].load(start, plan.n, w.x.data());
          model_row(plan.rules[m], x, b, start, /*inverse=*/false, 1.f, w, w.d_of(0), w.keep.data());
          l1_chunk(w.d_of(0), w.keep.data(), plan.n, sums[2 * m], sums[2 * m + 1]);
        }
      }
    }
  });
  double* result = out.data_ptr<double>();
  for (int64_t block = 0; block < blocks; ++block) {
    for (int i = 0; i < 2 * models; ++i) result[i] += partial[block * models * 2 + i];
  }
  return out;
}

// ------------------------------------------------------------------------------------------------------------

// The combination of merge_element() (common/merge_math.h) over a row, pass by pass: each element sees the float32
// operations of merge_element in the same order (sums start at 0 and add the models in order), so the result is
// bit-identical to it (and to the reference), while every loop runs over contiguous rows and vectorises.

// weighted = w * s; elector = weighted (weighted sign source) or s.
template <bool kUnweighted>
inline float elector_of(float weighted, float s) {
  return kUnweighted ? s : weighted;
}

// No consensus: acc += w * s.
void mix_pass(const float* __restrict s, float weight, int64_t n, float* __restrict acc) {
  for (int64_t j = 0; j < n; ++j) acc[j] += weight * s[j];
}

// Election total: acc += elector (sum) or sign(elector) (count).
template <bool kUnweighted, bool kCount>
void total_pass(const float* __restrict s, float weight, int64_t n, float* __restrict acc) {
  for (int64_t j = 0; j < n; ++j) {
    const float e = elector_of<kUnweighted>(weight * s[j], s[j]);
    acc[j] += kCount ? sign_of(e) : e;
  }
}

// One model's share of the agreeing sum and divisor, given majority[j] = +-1.
template <bool kUnweighted>
void agree_pass(const float* __restrict s, const float* __restrict majority, float weight, float term, int64_t n,
                float* __restrict mixed, float* __restrict div) {
  for (int64_t j = 0; j < n; ++j) {
    const float wd = weight * s[j];
    const bool agree = sign_of(elector_of<kUnweighted>(wd, s[j])) == majority[j];
    mixed[j] += agree ? wd : 0.f;
    div[j] += agree ? term : 0.f;
  }
}

enum Normalize : int { kKeepScale = 0, kByStatic = 1, kByAgreeing = 2 };

// out = base + lambda * (mixed / div); NaN where an input is NaN/Inf but the result is finite.
template <int kNormalize, bool kLambda, bool kBase>
void finish_pass(const float* __restrict mixed, const float* __restrict div, float static_div, float lambda,
                 const float* __restrict b, const uint8_t* __restrict bad, int64_t n, float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) {
    float v = mixed[j];
    if (kNormalize == kByStatic) v = v / static_div;
    if (kNormalize == kByAgreeing) v = v / (div[j] == 0.f ? 1.f : div[j]);
    if (kLambda) v = lambda * v;
    if (kBase) v = b[j] + v;
    out[j] = bad[j] && is_finite(v) ? quiet_nan() : v;
  }
}

// out = the merged row from the models' sparsified rows w.d_of(m).
void combine_row(const MergeParams& p, const float* b, RowWork& w, float* out) {
  const int64_t n = w.n;
  float* acc = w.acc.data();
  std::fill(acc, acc + n, 0.f);
  const float* mixed = acc;
  const bool unweighted = p.sign_source == kUnweighted;
  if (p.consensus == kNoConsensus) {
    for (int m = 0; m < p.n; ++m) mix_pass(w.d_of(m), p.weights[m], n, acc);
  } else {
    with_bool(unweighted, [&](auto uw) {
      with_bool(p.consensus == kCount, [&](auto count) {
        for (int m = 0; m < p.n; ++m) {
          total_pass<decltype(uw)::value, decltype(count)::value>(w.d_of(m), p.weights[m], n, acc);
        }
      });
    });
    for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] >= 0.f ? 1.f : -1.f;  // the majority (a NaN total: -1)
    std::fill(w.mixed.begin(), w.mixed.end(), 0.f);
    std::fill(w.div.begin(), w.div.end(), 0.f);
    with_bool(unweighted, [&](auto uw) {
      for (int m = 0; m < p.n; ++m) {
        const float term = p.divisor == kWeights ? p.weights[m] : 1.f;
        agree_pass<decltype(uw)::value>(w.d_of(m), acc, p.weights[m], term, n, w.mixed.data(), w.div.data());
      }
    });
    mixed = w.mixed.data();
  }
  const int normalize = !p.normalize ? kKeepScale : p.consensus == kNoConsensus ? kByStatic : kByAgreeing;
  with_bool(p.lambda != 1.f, [&](auto scaled) {
    with_bool(b != nullptr, [&](auto has_base) {
      auto run = [&](auto norm) {
        finish_pass<decltype(norm)::value, decltype(scaled)::value, decltype(has_base)::value>(
            mixed, w.div.data(), p.static_divisor, p.lambda, b, w.bad.data(), n, out);
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

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

at::Tensor della_merge(const c10::optional<at::Tensor>& base, at::TensorList tensors, at::ArrayRef<double> densities,
                       at::ArrayRef<double> epsilons, int64_t seed, bool inverse, const at::Tensor& scales,
                       at::ArrayRef<double> weights, int64_t sign_source, int64_t consensus, int64_t divisor,
                       bool normalize, double lambda, at::ScalarType out_dtype) {
  const char* op = "pykernels::della_merge";
  const DeltaInputs in = make_delta_inputs(base, tensors, op);
  const Plan plan = make_plan(tensors, densities, epsilons, seed, in, op);
  const int models = in.n();
  TORCH_CHECK(scales.numel() == models, op, ": scales must have ", models, " entries (got ", scales.numel(), ")");
  TORCH_CHECK(static_cast<int>(weights.size()) == models, op, ": weights must have ", models, " entries (got ",
              weights.size(), ")");
  TORCH_CHECK(sign_source == 0 || sign_source == 1, op, ": sign_source must be 0 or 1 (got ", sign_source, ")");
  TORCH_CHECK(consensus >= 0 && consensus <= 2, op, ": consensus must be 0, 1 or 2 (got ", consensus, ")");
  TORCH_CHECK(divisor == 0 || divisor == 1, op, ": divisor must be 0 or 1 (got ", divisor, ")");

  const at::Tensor scale_values = scales.to(at::kCPU, at::kFloat).contiguous();
  std::vector<float> weight_values(weights.begin(), weights.end());  // float32(w), as the reference
  MergeParams p{};
  p.n = models;
  p.weights = weight_values.data();
  p.scales = scale_values.data_ptr<float>();
  p.sign_source = static_cast<int>(sign_source);
  p.consensus = static_cast<int>(consensus);
  p.divisor = static_cast<int>(divisor);
  p.normalize = normalize;
  p.lambda = static_cast<float>(lambda);
  p.static_divisor = static_divisor(models, p.weights, p.divisor);
  p.has_base = in.has_base;

  const bool direct = is_supported_float(out_dtype);
  at::Tensor out = at::empty(tensors[0].sizes(), tensors[0].options().dtype(direct ? out_dtype : at::kFloat));
  if (plan.rows == 0) return direct ? out : out.to(out_dtype);
  const Sink sink(out);
  float* out_fp32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, plan.rows, rows_per_block(plan.n), [&](int64_t first, int64_t end) {
    RowWork w(models, plan.n);
    for (int64_t row = first; row < end; ++row) {
      const int64_t start = row * plan.n;
      const float* b = begin_row(plan, start, w);
      for (int m = 0; m < models; ++m) {
        const float* x = in.models[m].load(start, plan.n, w.x.data());
        model_row(plan.rules[m], x, b, start, inverse, p.scales[m], w, w.d_of(m), nullptr);
      }
      float* dst = out_fp32 != nullptr ? out_fp32 + start : w.out.data();
      combine_row(p, b, w, dst);
      if (out_fp32 == nullptr) sink.store(start, plan.n, dst);
    }
  });
  return direct ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("della_l1_norms", &della_l1_norms);
  m.impl("della_merge", &della_merge);
}

}  // namespace cpu
}  // namespace pykernels
