// CPU kernels of DELLA (docs/CONTRACT_ISSUE3.md "DELLA"; reference: pykernels/reference/della.py):
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
//   4. keeps d (or d / p with `inverse`) and the keep flag in the thread's row buffers;
// then evaluates merge_element() (common/merge_math.h: the per-element combination of fused_merge) for every
// element of the row and writes the output row. Every element sees the float32 operations of the reference in
// the same order, so the output is bit-identical to it for any thread count.
//
// Shortcuts that do not change a single bit: a model with density >= 1 keeps everything (p = 1, d / 1 = d), one
// with density <= 0 nothing; a model with step == 0 (epsilon 0, or n == 1) has p = lo at every rank, so its row
// is not ranked (p is only used where it is > 0, i.e. where something is kept, and lo + 0 == lo there).
//
// Extra memory: the output, plus per-thread row buffers of about (5 N + 40) bytes per element of a row (N models).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
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
        keep(static_cast<size_t>(models) * n),
        bad(n),
        keys(n),
        order(n),
        ranks(n) {}

  float* d_of(int m) { return d.data() + static_cast<int64_t>(m) * n; }
  uint8_t* keep_of(int m) { return keep.data() + static_cast<int64_t>(m) * n; }

  int64_t n;
  std::vector<float> base, x, u, out;
  std::vector<float> d;        // (models, n): d, or d / p with inverse
  std::vector<uint8_t> keep;   // (models, n)
  std::vector<uint8_t> bad;    // an input is NaN/Inf at this element
  std::vector<uint32_t> keys, order;
  std::vector<int32_t> ranks;  // 1-based
  RowSortScratch sort;
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

// keep[j] = u[j] < p_j with p_j = lo + step * float32(r_j - 1); with kInverse d[j] = d[j] / p_j.
template <bool kRanked, bool kInverse>
void keep_row(const float* __restrict u, const int32_t* __restrict ranks, float lo, float step, int64_t n,
              float* __restrict d, uint8_t* __restrict keep) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = kRanked ? lo + step * static_cast<float>(ranks[j] - 1) : lo;
    keep[j] = u[j] < p;
    if (kInverse) d[j] = d[j] / p;  // used only where kept (p > 0)
  }
}

// Model m's d (or d / p with inverse) and keep flags for the row starting at flat index `start`.
void model_row(const DellaRule& rule, const float* x, const float* b, int64_t start, bool inverse, RowWork& w,
               float* d, uint8_t* keep) {
  const int64_t n = w.n;
  with_bool(b != nullptr, [&](auto has_base) { delta_row<decltype(has_base)::value>(x, b, n, d, w.bad.data()); });
  if (rule.kind == DellaRule::kAll) {
    std::fill(keep, keep + n, uint8_t(1));  // p = 1: d / 1 == d
    return;
  }
  if (rule.kind == DellaRule::kNone) {
    std::fill(keep, keep + n, uint8_t(0));
    return;
  }
  philox_uniform_fill(rule.seed, start, n, w.u.data());
  const bool ranked = rule.step != 0.f;
  if (ranked) {
    for (int64_t j = 0; j < n; ++j) w.keys[j] = magnitude_key(d[j]);
    stable_key_ranks(w.keys.data(), n, w.order.data(), w.ranks.data(), w.sort);
  }
  with_bool(ranked, [&](auto r) {
    with_bool(inverse, [&](auto inv) {
      keep_row<decltype(r)::value, decltype(inv)::value>(w.u.data(), w.ranks.data(), rule.lo, rule.step, n, d,
                                                         keep);
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
          model_row(plan.rules[m], x, b, start, /*inverse=*/false, w, w.d_of(0), w.keep_of(0));
          l1_chunk(w.d_of(0), w.keep_of(0), plan.n, sums[2 * m], sums[2 * m + 1]);
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

// out[j] = merge_element(d[.][j], keep[.][j]) for the row.
void combine_row(const MergeParams& p, const float* b, RowWork& w, float* out) {
  float d[kMaxModels];
  bool keep[kMaxModels];
  const int64_t n = w.n;
  for (int64_t j = 0; j < n; ++j) {
    for (int m = 0; m < p.n; ++m) {
      d[m] = w.d[m * n + j];
      keep[m] = w.keep[m * n + j] != 0;
    }
    out[j] = merge_element(p, d, keep, b != nullptr ? b[j] : 0.f, w.bad[j] != 0);
  }
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
        model_row(plan.rules[m], x, b, start, inverse, w, w.d_of(m), w.keep_of(m));
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
