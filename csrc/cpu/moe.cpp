// CPU kernels of MoE routing (contract: docs/PRIMITIVES.md "MoE routing"; reference: pykernels/reference/moe.py).
//
// moe_topk_route: one pass per token row. The row is widened to float32 in a small buffer padded to whole
// 16-lane vectors; scores (softmax / sigmoid) and selection keys are computed with vector loops; the top-k is a
// sorted list on the stack that only sees the candidates a vector compare lets through (key above the current
// k-th key), so a row costs about E compares plus a few insertions. Experts are scanned in ascending index, so
// "ties to the lower expert index" is simply "an equal key never displaces a stored one".
// moe_align_block_size / moe_permute: counting sorts. Pairs are cut into fixed chunks (never derived from the
// thread count); per-chunk expert counts, exclusive scans over (expert, chunk), then a stable scatter of each
// chunk: every expert's pairs land in ascending flattened index whatever the scheduling.
// moe_unpermute: per token, float32 accumulation of weight * row over its pairs in ascending j (the reference's
// order), rounded once to the output dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // the header's #pragma unroll is for nvcc
#include "common/moe_topk.h"
#pragma GCC diagnostic pop
#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr int64_t kVec = 16;              // float lanes of the row buffers (one AVX-512 vector)
constexpr int64_t kRouteGrain = 64;       // tokens per parallel task
constexpr int64_t kPairChunk = 1 << 14;   // pairs per counting-sort chunk
constexpr int64_t kRowGrain = 64;         // rows per parallel task of the gathers and the combine
constexpr int64_t kPrefetchRows = 4;      // rows a gather reads ahead

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---- vector math ---------------------------------------------------------------------------------------------

#if defined(PK_AVX512)
// exp of 16 floats: Cephes' range reduction and degree-7 polynomial (about 1 ulp), 0 below -87.3 (where
// float32 leaves the normal range; the reference's denormal results there are below 1.2e-38).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}
#endif

// Largest of x[0, n), n a multiple of kVec.
float row_max(const float* x, int64_t n) {
#if defined(PK_AVX512)
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += kVec) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  return _mm512_reduce_max_ps(m);
#else
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

// out = exp(x - shift) for x[0, n), n a multiple of kVec; returns the sum of out.
float exp_shifted(const float* x, float shift, int64_t n, float* out) {
#if defined(PK_AVX512)
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kVec) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    _mm512_storeu_ps(out + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += out[i] = std::exp(x[i] - shift);
  return sum;
#endif
}

// out = 1 / (1 + exp(-x)) for x[0, n), n a multiple of kVec.
void sigmoid(const float* x, int64_t n, float* out) {
#if defined(PK_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(x + i)));
    _mm512_storeu_ps(out + i, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = 1.f / (1.f + std::exp(-x[i]));
#endif
}

// ---- moe_topk_route ------------------------------------------------------------------------------------------

// The first k candidates in (key desc, expert asc) order, fed in ascending expert order.
struct TopK {
  int k;
  int size = 0;
  float key[kMoeMaxK];
  int32_t id[kMoeMaxK];

  explicit TopK(int k_) : k(k_) {}

  // Keys above this may enter; every key may while the list is not full.
  bool full() const { return size == k; }
  float bar() const { return key[k - 1]; }

  void insert(float c_key, int32_t c_id) {
    if (full() && !(c_key > bar())) return;
    int pos = full() ? k - 1 : size++;
    for (; pos > 0 && c_key > key[pos - 1]; --pos) {
      key[pos] = key[pos - 1];
      id[pos] = id[pos - 1];
    }
    key[pos] = c_key;
    id[pos] = c_id;
  }
};

// Offers keys[0, experts) to the list; a vector compare skips the keys that cannot enter.
void offer_all(const float* keys, int64_t experts, TopK& top) {
  int64_t e = 0;
  for (; e < experts && !top.full(); ++e) top.insert(keys[e], static_cast<int32_t>(e));
#if defined(PK_AVX512)
  for (int64_t base = e; base < experts; base += kVec) {
    const int64_t len = std::min<int64_t>(kVec, experts - base);
    const __mmask16 valid = static_cast<__mmask16>((1u << len) - 1u);
    uint32_t pass = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(keys + base), _mm512_set1_ps(top.bar()),
                                            _CMP_GT_OQ);
    while (pass) {
      const int lane = __builtin_ctz(pass);
      top.insert(keys[base + lane], static_cast<int32_t>(base + lane));
      pass &= pass - 1;
    }
  }
#else
  for (; e < experts; ++e) top.insert(keys[e], static_cast<int32_t>(e));
#endif
}

#if defined(PK_AVX512)
// How many of the 16 (key, id) lanes come before lane `i` in (key desc, id asc) order.
inline int rank_among(__m512 keys, __m512i ids, float key, int32_t id) {
  const __m512 k = _mm512_set1_ps(key);
  const __mmask16 greater = _mm512_cmp_ps_mask(keys, k, _CMP_GT_OQ);
  const __mmask16 equal_lower = _mm512_mask_cmplt_epi32_mask(_mm512_cmp_ps_mask(keys, k, _CMP_EQ_OQ), ids,
                                                             _mm512_set1_epi32(id));
  return __builtin_popcount(static_cast<uint32_t>(greater | equal_lower));
}

// The top k (k <= 16) of keys[0, padded) (padding: -inf) without a sorted insertion per candidate: the k-th
// largest of the 16 lane-wise maxima is a lower bound of the k-th key (those maxima are k distinct keys), so only
// keys at or above it can win; when at most 16 do, their ranks by all-pairs vector compares place them. Returns
// false (nothing written) when more than 16 keys pass (heavy ties), for the sorted insertion to handle.
bool select_small_k(const float* keys, int64_t padded, int k, int32_t* ids_out) {
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 lane_max = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < padded; i += kVec) lane_max = _mm512_max_ps(lane_max, _mm512_loadu_ps(keys + i));
  alignas(64) float maxima[kVec];
  _mm512_store_ps(maxima, lane_max);
  float bar = -INFINITY;
  for (int lane = 0; lane < kVec; ++lane) {
    if (rank_among(lane_max, lane_ids, maxima[lane], lane) == k - 1) bar = maxima[lane];
  }
  alignas(64) float cand_key[2 * kVec];
  alignas(64) int32_t cand_id[2 * kVec];
  int count = 0;
  const __m512 bar_v = _mm512_set1_ps(bar);
  for (int64_t i = 0; i < padded; i += kVec) {
    const __m512 v = _mm512_loadu_ps(keys + i);
    const __mmask16 pass = _mm512_cmp_ps_mask(v, bar_v, _CMP_GE_OQ);
    if (pass == 0) continue;
    // register compress + plain store: the memory form of vcompressps is microcoded and slow
    _mm512_storeu_ps(cand_key + count, _mm512_maskz_compress_ps(pass, v));
    _mm512_storeu_si512(cand_id + count, _mm512_maskz_compress_epi32(
                                             pass, _mm512_add_epi32(lane_ids, _mm512_set1_epi32(static_cast<int32_t>(i)))));
    count += __builtin_popcount(static_cast<uint32_t>(pass));
    if (count > kVec) return false;
  }
  const __mmask16 used = static_cast<__mmask16>((1u << count) - 1u);
  const __m512 ck = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), used, cand_key);
  const __m512i cid = _mm512_mask_loadu_epi32(_mm512_set1_epi32(kNoExpert), used, cand_id);
  for (int c = 0; c < count; ++c) {
    const int before = rank_among(ck, cid, cand_key[c], cand_id[c]);
    if (before < k) ids_out[before] = cand_id[c];
  }
  return true;
}
#endif

// ids_out[0, k) = the k first experts in (key desc, expert asc) order; keys padded with -inf to `padded`.
void select_topk(const float* keys, int64_t experts, int64_t padded, int k, int32_t* ids_out) {
#if defined(PK_AVX512)
  if (k <= kVec && select_small_k(keys, padded, k, ids_out)) return;
#endif
  TopK top(k);
  offer_all(keys, experts, top);
  std::copy(top.id, top.id + k, ids_out);
}

struct RouteParams {
  int64_t experts, padded;
  int k;
  bool softmax, renormalize;
  const float* bias;  // (E,) or nullptr
  int groups, kept_groups;
  float scaling;
};

// Group g's score: its largest key (no bias) or the sum of its two largest (bias; the largest alone when the
// group has one expert), as in common/moe_topk.h's group_score.
float group_score_of(const float* keys, int64_t size, bool has_bias) {
#if defined(PK_AVX512)
  if (size % kVec == 0) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < size; i += kVec) top = _mm512_max_ps(top, _mm512_loadu_ps(keys + i));
    const float first = _mm512_reduce_max_ps(top);
    if (!has_bias) return first;
    // the second largest is `first` again when it occurs twice, else the largest key below it
    const __m512 first_v = _mm512_set1_ps(first);
    __m512 below = _mm512_set1_ps(-INFINITY);
    int equal = 0;
    for (int64_t i = 0; i < size; i += kVec) {
      const __m512 v = _mm512_loadu_ps(keys + i);
      equal += __builtin_popcount(static_cast<uint32_t>(_mm512_cmp_ps_mask(v, first_v, _CMP_EQ_OQ)));
      below = _mm512_mask_max_ps(below, _mm512_cmp_ps_mask(v, first_v, _CMP_LT_OQ), below, v);
    }
    return first + (equal >= 2 ? first : _mm512_reduce_max_ps(below));
  }
#endif
  float first = -INFINITY, second = -INFINITY;
  for (int64_t i = 0; i < size; ++i) {
    if (keys[i] > first) {
      second = first;
      first = keys[i];
    } else if (keys[i] > second) {
      second = keys[i];
    }
  }
  return has_bias && size > 1 ? first + second : first;
}

// Keys of the experts outside the kept groups become -inf (they stay candidates, after every kept expert).
void mask_groups(const RouteParams& p, float* keys) {
  const int64_t size = p.experts / p.groups;
  float scores[kMoeMaxExperts];
  for (int g = 0; g < p.groups; ++g) scores[g] = group_score_of(keys + g * size, size, p.bias != nullptr);
  for (int g = 0; g < p.groups; ++g) {
    if (!group_kept(scores, p.groups, g, p.kept_groups)) std::fill(keys + g * size, keys + (g + 1) * size, -INFINITY);
  }
}

// One token: x holds the row's logits and key the selection keys, both padded with -inf to p.padded; score is
// scratch. Without a bias the logits are the keys (same order as the scores), and a softmax needs only the
// row's sum of exps and the winners' scores.
void route_token(const RouteParams& p, float* x, float* score, float* key, float* weights, int32_t* ids) {
  // score[e] holds the score itself, or with a softmax without a bias only its numerator exp(x - max)
  float divisor = 1.f;
  if (p.softmax) {
    divisor = exp_shifted(x, row_max(x, p.padded), p.padded, score);
  } else {
    sigmoid(x, p.padded, score);
  }
  const float* keys = x;
  if (p.bias != nullptr) {
    for (int64_t e = 0; e < p.experts; ++e) {
      score[e] = score[e] / divisor;
      key[e] = score[e] + p.bias[e];
    }
    divisor = 1.f;
    keys = key;
  }
  if (p.groups > 1) {
    if (keys == x) std::copy(x, x + p.experts, key);
    keys = key;
    mask_groups(p, key);
  }
  select_topk(keys, p.experts, p.padded, p.k, ids);
  float chosen[kMoeMaxK];
  float total = 0.f;
  for (int j = 0; j < p.k; ++j) {
    chosen[j] = score[ids[j]] / divisor;
    total += chosen[j];
  }
  for (int j = 0; j < p.k; ++j) weights[j] = route_weight(chosen[j], total, p.renormalize, p.scaling);
}

std::tuple<at::Tensor, at::Tensor> moe_topk_route(const at::Tensor& logits_in, int64_t k, int64_t scoring,
                                                  const c10::optional<at::Tensor>& bias_in, bool renormalize,
                                                  int64_t num_groups, int64_t topk_groups, double scaling) {
  TORCH_CHECK(logits_in.dim() == 2, "moe_topk_route: logits must be (tokens, experts)");
  TORCH_CHECK(is_supported_float(logits_in.scalar_type()), "moe_topk_route: logits must be fp32, bf16 or fp16");
  const int64_t tokens = logits_in.size(0), experts = logits_in.size(1);
  TORCH_CHECK(experts >= 1 && experts <= kMoeMaxExperts, "moe_topk_route: experts must be in [1, 1024]");
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(experts, kMoeMaxK), "moe_topk_route: k must be in [1, min(E, 32)]");
  TORCH_CHECK(scoring == kMoeSoftmax || scoring == kMoeSigmoid, "moe_topk_route: unknown scoring ", scoring);
  const bool grouped = num_groups > 1;
  if (grouped) {
    TORCH_CHECK(experts % num_groups == 0 && topk_groups >= 1 && topk_groups <= num_groups &&
                    k <= topk_groups * (experts / num_groups),
                "moe_topk_route: bad grouping (", num_groups, " groups, ", topk_groups, " kept) for E=", experts);
  }
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == experts, "moe_topk_route: bias must have E elements");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  at::Tensor weights = at::empty({tokens, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, k}, logits.options().dtype(at::kInt));
  const RouteParams p{experts, round_up(experts, kVec), static_cast<int>(k), scoring == kMoeSoftmax, renormalize,
                      bias.defined() ? bias.data_ptr<float>() : nullptr, grouped ? static_cast<int>(num_groups) : 1,
                      static_cast<int>(topk_groups), static_cast<float>(scaling)};
  const Source rows(logits);
  float* w = weights.data_ptr<float>();
  int32_t* out_ids = ids.data_ptr<int32_t>();
  at::parallel_for(0, tokens, kRouteGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * p.padded);
    float *x = buf.data(), *score = x + p.padded, *key = score + p.padded;
    std::fill(x + experts, x + p.padded, -INFINITY);
    std::fill(key + experts, key + p.padded, -INFINITY);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = rows.load(t * experts, experts, x);
      if (row != x) std::copy(row, row + experts, x);
      route_token(p, x, score, key, w + t * k, out_ids + t * k);
    }
  });
  return {weights, ids};
}

// ---- counting sort of the pairs by expert ----------------------------------------------------------------------

// fn(chunk, pair, expert) for every pair, chunk by chunk in parallel (pairs in ascending order within a chunk).
template <typename Fn>
void for_each_pair(const int32_t* ids, int64_t pairs, Fn fn) {
  const int64_t chunks = (pairs + kPairChunk - 1) / kPairChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t last = std::min(pairs, (c + 1) * kPairChunk);
      for (int64_t p = c * kPairChunk; p < last; ++p) fn(c, p, ids[p]);
    }
  });
}

// Per-chunk expert counts of the flattened pairs: counts[c * E + e]. Raises on an id outside [0, E).
std::vector<int64_t> chunk_counts(const int32_t* ids, int64_t pairs, int64_t experts) {
  std::vector<int64_t> counts((pairs + kPairChunk - 1) / kPairChunk * experts, 0);
  std::atomic<bool> bad{false};
  for_each_pair(ids, pairs, [&](int64_t c, int64_t, int32_t e) {
    if (e < 0 || e >= experts) {
      bad.store(true, std::memory_order_relaxed);
    } else {
      ++counts[c * experts + e];
    }
  });
  TORCH_CHECK(!bad, "moe: ids must be expert indices in [0, ", experts, ")");
  return counts;
}

// Turns chunk_counts into the position where chunk c's first pair of expert e goes, given each expert's start.
void scan_chunks(std::vector<int64_t>& counts, int64_t experts, const std::vector<int64_t>& starts) {
  const int64_t chunks = static_cast<int64_t>(counts.size()) / experts;
  for (int64_t e = 0; e < experts; ++e) {
    int64_t running = starts[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = counts[c * experts + e];
      counts[c * experts + e] = running;
      running += n;
    }
  }
}

std::vector<int64_t> expert_totals(const std::vector<int64_t>& counts, int64_t experts) {
  std::vector<int64_t> totals(experts, 0);
  for (size_t i = 0; i < counts.size(); ++i) totals[i % experts] += counts[i];
  return totals;
}

// Writes every pair p with keep(e) at out[next[chunk][e]++]: ascending p within each expert.
template <typename Index, typename Keep>
void scatter_pairs(const int32_t* ids, int64_t pairs, int64_t experts, std::vector<int64_t>& next, Index* out,
                   Keep keep) {
  for_each_pair(ids, pairs, [&](int64_t c, int64_t p, int32_t e) {
    if (keep(e)) out[next[c * experts + e]++] = static_cast<Index>(p);
  });
}

// ---- moe_align_block_size ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size(const at::Tensor& ids_in, int64_t experts,
                                                                   int64_t block_size,
                                                                   const c10::optional<at::Tensor>& map_in) {
  TORCH_CHECK(ids_in.scalar_type() == at::kInt, "moe_align_block_size: ids must be int32");
  TORCH_CHECK(experts >= 1 && block_size >= 1, "moe_align_block_size: num_experts and block_size must be >= 1");
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor map;
  if (map_in.has_value()) {
    TORCH_CHECK(map_in->numel() == experts && map_in->scalar_type() == at::kInt,
                "moe_align_block_size: expert_map must be int32 (E,)");
    map = map_in->contiguous();
  }
  const int32_t* expert_map = map.defined() ? map.data_ptr<int32_t>() : nullptr;
  const int64_t pairs = ids.numel();
  const int64_t capacity = align_capacity(pairs, experts, block_size);
  std::vector<int64_t> counts = chunk_counts(ids.data_ptr<int32_t>(), pairs, experts);
  const std::vector<int64_t> totals = expert_totals(counts, experts);
  std::vector<int64_t> starts(experts), runs(experts);
  int64_t total = 0;
  for (int64_t e = 0; e < experts; ++e) {
    starts[e] = total;
    runs[e] = expert_run(totals[e], local_expert(static_cast<int32_t>(e), expert_map), block_size);
    total += runs[e];
  }
  scan_chunks(counts, experts, starts);
  at::Tensor sorted = at::empty({capacity}, ids.options());
  at::Tensor blocks = at::full({capacity / block_size}, -1, ids.options());
  int32_t* out = sorted.data_ptr<int32_t>();
  int32_t* block_ids = blocks.data_ptr<int32_t>();
  const int32_t sentinel = static_cast<int32_t>(pairs);
  for (int64_t e = 0; e < experts; ++e) {
    if (runs[e] == 0) continue;
    std::fill(out + starts[e] + totals[e], out + starts[e] + runs[e], sentinel);
    std::fill(block_ids + starts[e] / block_size, block_ids + (starts[e] + runs[e]) / block_size,
              local_expert(static_cast<int32_t>(e), expert_map));
  }
  std::fill(out + total, out + capacity, sentinel);
  scatter_pairs(ids.data_ptr<int32_t>(), pairs, experts, counts, out,
                [&](int32_t e) { return runs[e] > 0; });
  return {sorted, blocks, at::full({1}, total, ids.options())};
}

// ---- moe_permute ---------------------------------------------------------------------------------------------

// Marks as dropped the pairs of every expert over `cap`: all but its `cap` pairs of largest weight (ties: the
// lower flattened index stays). grouped holds every expert's pairs in ascending index at offsets[e].
void drop_over_capacity(const int64_t* grouped, const std::vector<int64_t>& offsets, const float* weights,
                        int64_t cap, bool* dropped) {
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1;
  at::parallel_for(0, experts, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t e = begin; e < end; ++e) {
      if (offsets[e + 1] - offsets[e] <= cap) continue;
      order.assign(grouped + offsets[e], grouped + offsets[e + 1]);
      auto first = [&](int64_t a, int64_t b) { return weights[a] > weights[b] || (weights[a] == weights[b] && a < b); };
      std::nth_element(order.begin(), order.begin() + cap, order.end(), first);
      for (auto it = order.begin() + cap; it != order.end(); ++it) dropped[*it] = true;
    }
  });
}

// x_sorted[i] = x[perm[i] / k], whole rows copied.
void gather_rows(const at::Tensor& x, const int64_t* perm, int64_t rows, int64_t k, at::Tensor& out) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
#if defined(PK_AVX512)
  // the output is written once and read later by the expert GEMMs: streaming stores skip the read for ownership
  if (row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const char* from = src + perm[i] / k * row_bytes;
        const char* ahead = src + perm[std::min(i + kPrefetchRows, end - 1)] / k * row_bytes;
        char* to = dst + i * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64) {
          _mm_prefetch(ahead + b, _MM_HINT_T0);  // rows come from scattered tokens: start the next ones early
          _mm512_stream_si512(reinterpret_cast<__m512i*>(to + b), _mm512_loadu_si512(from + b));
        }
      }
      _mm_sfence();
    });
    return;
  }
#endif
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * row_bytes, src + perm[i] / k * row_bytes, row_bytes);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                                       const c10::optional<at::Tensor>& weights_in,
                                                                       int64_t experts, double capacity_factor) {
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.scalar_type() == at::kInt, "moe_permute: ids must be int32 (T, k)");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == ids_in.size(0), "moe_permute: x must be (T, H)");
  TORCH_CHECK(experts >= 1, "moe_permute: num_experts must be >= 1");
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const int64_t k = ids.size(1), pairs = ids.numel();
  const int64_t cap = capacity_factor > 0
                          ? static_cast<int64_t>(std::ceil(capacity_factor * static_cast<double>(pairs) /
                                                           static_cast<double>(experts)))
                          : pairs;
  std::vector<int64_t> counts = chunk_counts(ids.data_ptr<int32_t>(), pairs, experts);
  const std::vector<int64_t> totals = expert_totals(counts, experts);
  std::vector<int64_t> offsets(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + totals[e];
  scan_chunks(counts, experts, std::vector<int64_t>(offsets.begin(), offsets.end() - 1));

  at::Tensor perm = at::empty({pairs}, ids.options().dtype(at::kLong));
  at::Tensor dropped = at::zeros({ids.size(0), k}, ids.options().dtype(at::kBool));
  int64_t* out = perm.data_ptr<int64_t>();
  const bool capped = std::any_of(totals.begin(), totals.end(), [&](int64_t n) { return n > cap; });
  if (!capped) {
    scatter_pairs(ids.data_ptr<int32_t>(), pairs, experts, counts, out, [](int32_t) { return true; });
  } else {
    TORCH_CHECK(weights_in.has_value() && weights_in->numel() == pairs,
                "moe_permute: capacity dropping needs the (T, k) routing weights");
    const at::Tensor weights = weights_in->to(at::kFloat).contiguous();
    std::vector<int64_t> grouped(pairs);
    scatter_pairs(ids.data_ptr<int32_t>(), pairs, experts, counts, grouped.data(), [](int32_t) { return true; });
    bool* drop = dropped.data_ptr<bool>();
    drop_over_capacity(grouped.data(), offsets, weights.data_ptr<float>(), cap, drop);
    // kept pairs by (expert, index), then the dropped ones by index
    const std::vector<int64_t> all = offsets;
    int64_t row = 0;
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t i = all[e]; i < all[e + 1]; ++i) {
        if (!drop[grouped[i]]) out[row++] = grouped[i];
      }
      offsets[e + 1] = row;
    }
    for (int64_t p = 0; p < pairs; ++p) {
      if (drop[p]) out[row++] = p;
    }
  }
  at::Tensor x_sorted = at::empty({pairs, x.size(1)}, x.options());
  advise_huge_pages(x_sorted);
  gather_rows(x, out, pairs, std::max<int64_t>(k, 1), x_sorted);
  at::Tensor offsets_t = at::empty({experts + 1}, ids.options().dtype(at::kLong));
  std::copy(offsets.begin(), offsets.end(), offsets_t.data_ptr<int64_t>());
  return {x_sorted, perm, offsets_t, dropped};
}

// ---- moe_unpermute -------------------------------------------------------------------------------------------

// out (fp32 / bf16 / fp16 row) = acc rounded to nearest even.
void store_row(const float* acc, int64_t n, at::ScalarType dtype, void* out) {
  switch (dtype) {
    case at::kFloat:
      std::memcpy(out, acc, n * sizeof(float));
      break;
    case at::kBFloat16:
      float_to_bf16(acc, n, static_cast<uint16_t*>(out));
      break;
    default:
      float_to_half(acc, n, static_cast<uint16_t*>(out));
  }
}

at::Tensor moe_unpermute(const at::Tensor& y_in, const at::Tensor& perm_in, const at::Tensor& weights_in) {
  TORCH_CHECK(y_in.dim() == 2 && perm_in.dim() == 1 && y_in.size(0) == perm_in.size(0),
              "moe_unpermute: y (rows, H) and perm (rows,) must agree");
  TORCH_CHECK(is_supported_float(y_in.scalar_type()), "moe_unpermute: y must be fp32, bf16 or fp16");
  TORCH_CHECK(weights_in.dim() == 2, "moe_unpermute: weights must be (T, k)");
  const at::Tensor y = y_in.contiguous(), perm = perm_in.to(at::kLong).contiguous();
  const at::Tensor weights = weights_in.to(at::kFloat).contiguous();
  const int64_t tokens = weights.size(0), k = weights.size(1), pairs = weights.numel(), hidden = y.size(1);
  // row of each pair (-1: dropped); serial, so a pair named twice is reported instead of racing
  std::vector<int64_t> row_of(pairs, -1);
  const int64_t* pm = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < perm.numel(); ++i) {
    TORCH_CHECK(pm[i] >= 0 && pm[i] < pairs, "moe_unpermute: perm holds ", pm[i], ", outside [0, ", pairs, ")");
    TORCH_CHECK(row_of[pm[i]] < 0, "moe_unpermute: perm names pair ", pm[i], " twice");
    row_of[pm[i]] = i;
  }
  at::Tensor out = at::empty({tokens, hidden}, y.options());
  const Source rows(y);
  const float* w = weights.data_ptr<float>();
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t out_row_bytes = hidden * out.element_size();
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(hidden), scratch(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = row_of[t * k + j];
        if (i < 0) continue;
        const float wj = w[t * k + j];
        const float* src = rows.load(i * hidden, hidden, scratch.data());
        for (int64_t h = 0; h < hidden; ++h) acc[h] += src[h] * wj;
      }
      store_row(acc.data(), hidden, y.scalar_type(), dst + t * out_row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("moe_topk_route", &moe_topk_route);
  m.impl("moe_align_block_size", &moe_align_block_size);
  m.impl("moe_permute", &moe_permute);
  m.impl("moe_unpermute", &moe_unpermute);
}

}  // namespace cpu
}  // namespace pykernels
