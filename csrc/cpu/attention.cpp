// CPU kernel of pbs_block_attention (docs/PRIMITIVES.md "Attention"; reference.attention.pbs_block_attention):
// block-sparse flash attention over the key blocks a plan lists, reading K and V rows through the permutation.
//
// One task = one query block of up to kHeadTile query heads that share a kv head. The task walks the union of
// its heads' block lists in ascending order; each listed key block is gathered once (K transposed, V as rows,
// through perm) into per-thread tiles and used by every head that lists it, so GQA heads share the gather.
// Matrix products go through ATen's cpublas::brgemm (oneDNN micro-kernels: AVX-512 for float32, AMX for
// bfloat16 when the CPU has it, with the probabilities rounded to bfloat16 like flash attention does); float16
// and bfloat16 without AMX are converted to float32 on load. Softmax and accumulation are float32 throughout.
// Tasks are handed out dynamically, largest first, because causal lists grow with the query block.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

namespace blas = at::native::cpublas;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kHeadTile = 8;    // query heads per task (one bit each in a block's mark)
constexpr int64_t kMaxRun = 4;      // key blocks per key tile
constexpr int64_t kPackWidth = 64;  // widest column chunk cpublas::pack accepts
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Strides {
  int64_t batch, head, token;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Everything a task reads, shared by all threads.
template <typename In>
struct Problem {
  int64_t hq, hkv, n, d, bs, nb;
  float scale;
  const In *q, *k, *v;
  Strides qs, ks, vs;
  const int32_t* perm;  // (B, Hkv, N) contiguous
  const int64_t* offsets;
  const int32_t* indices;
  In* out;     // (B, Hq, N, D) contiguous
  float* lse;  // (B, Hq, N)
};

struct Task {
  int64_t batch, kv_head, qblock, head0, heads, cost;
};

template <typename Mat, typename In>
inline Mat to_mat(In x) {
  if constexpr (std::is_same_v<Mat, float>) {
    return static_cast<float>(x);
  } else {
    return x;  // bfloat16 input on the bfloat16 path: copied as is
  }
}

// Per-thread tiles and online-softmax state of one task. Runs of up to kMaxRun consecutive key blocks listed by
// the same heads form one key tile (a causal list is mostly such runs): wider tiles mean fewer softmax passes
// and larger matrix products.
template <typename In, typename Mat>
class Worker {
 public:
  static constexpr bool kVnni = std::is_same_v<Mat, at::BFloat16>;

  explicit Worker(const Problem<In>& p)
      : p_(p),
        heads_(std::min(kHeadTile, p.hq / p.hkv)),
        width_(kMaxRun * p.bs),
        q_(heads_ * p.bs * p.d),
        k_rows_(width_ * p.d),
        kt_(p.d * width_),
        v_(width_ * p.d),
        kt_packed_(kVnni ? p.d * width_ : 0),
        v_packed_(kVnni ? width_ * p.d : 0),
        s_(p.bs * width_),
        p_mat_(kVnni ? p.bs * width_ : 0),
        o_(heads_ * p.bs * p.d),
        pv_(p.bs * p.d),
        alpha_(p.bs),
        m_(heads_ * p.bs),
        l_(heads_ * p.bs),
        first_row_(width_),
        marks_(p.nb, 0) {}

  void run(const Task& task) {
    const int64_t r0 = task.qblock * p_.bs;
    const int64_t rows = std::min(p_.bs, p_.n - r0);
    load_queries(task, r0, rows);
    mark_blocks(task);
    for (int64_t kb = 0; kb < p_.nb;) {
      const uint32_t heads = marks_[kb];
      int64_t run = 1;
      while (heads && run < kMaxRun && kb + run < p_.nb && marks_[kb + run] == heads) ++run;
      std::fill(marks_.begin() + kb, marks_.begin() + kb + run, 0u);
      if (heads) {
        const bool masked = gather_tile(task, kb, run, r0);
        for (int64_t t = 0; t < task.heads; ++t) {
          if (!(heads >> t & 1)) continue;
          scores(t);
          softmax_step(t, rows, masked);
          accumulate(t, rows);
        }
      }
      kb += run;
    }
    store(task, r0, rows);
  }

 private:
  const Problem<In>& p_;
  const int64_t heads_, width_;  // capacity: query heads per task, key columns per tile
  int64_t cols_ = 0;             // key columns of the current tile (a multiple of bs; zero keys past N)
  std::vector<Mat> q_, k_rows_, kt_, v_, kt_packed_, v_packed_;
  std::vector<float> s_;
  std::vector<Mat> p_mat_;
  std::vector<float> o_, pv_, alpha_, m_, l_;
  std::vector<float> first_row_;  // per key column: the first row of the query block that sees it (<= bs)
  std::vector<uint32_t> marks_;

  const In* row_of(const In* base, const Strides& s, int64_t b, int64_t h, int64_t t) const {
    return base + b * s.batch + h * s.head + t * s.token;
  }

  void load_queries(const Task& task, int64_t r0, int64_t rows) {
    const int64_t bs = p_.bs, d = p_.d;
    for (int64_t t = 0; t < task.heads; ++t) {
      Mat* dst = q_.data() + t * bs * d;
      for (int64_t i = 0; i < bs; ++i) {
        if (i < rows) {
          copy_row(row_of(p_.q, p_.qs, task.batch, task.head0 + t, r0 + i), dst + i * d);
        } else {
          std::fill(dst + i * d, dst + (i + 1) * d, Mat(0));  // rows past N: zeros, never stored
        }
      }
    }
    std::fill(o_.begin(), o_.end(), 0.f);
    std::fill(m_.begin(), m_.end(), kNegInf);
    std::fill(l_.begin(), l_.end(), 0.f);
  }

  void mark_blocks(const Task& task) {
    for (int64_t t = 0; t < task.heads; ++t) {
      const int64_t row = ((task.batch * p_.hq) + task.head0 + t) * p_.nb + task.qblock;
      for (int64_t e = p_.offsets[row]; e < p_.offsets[row + 1]; ++e) marks_[p_.indices[e]] |= 1u << t;
    }
  }

  // K^T (d x cols) and V (cols x d) of key blocks kb .. kb+run-1 read through perm; columns past N are zero
  // keys that the mask removes. Returns whether some key is invisible to some row of the query block.
  bool gather_tile(const Task& task, int64_t kb, int64_t run, int64_t r0) {
    const int64_t d = p_.d, c0 = kb * p_.bs;
    cols_ = run * p_.bs;
    const int64_t valid = std::min(cols_, p_.n - c0);
    const int32_t* perm = p_.perm + (task.batch * p_.hkv + task.kv_head) * p_.n + c0;
    int64_t newest = 0;
    for (int64_t j = 0; j < cols_; ++j) {
      if (j < valid) {
        const int64_t key = perm[j];
        first_row_[j] = static_cast<float>(std::min(std::max(key - r0, int64_t{0}), p_.bs));
        newest = std::max(newest, key);
        copy_row(row_of(p_.k, p_.ks, task.batch, task.kv_head, key), k_rows_.data() + j * d);
        copy_row(row_of(p_.v, p_.vs, task.batch, task.kv_head, key), v_.data() + j * d);
      } else {
        first_row_[j] = static_cast<float>(p_.bs);  // padding: seen by no row
        std::fill(k_rows_.begin() + j * d, k_rows_.begin() + (j + 1) * d, Mat(0));
        std::fill(v_.begin() + j * d, v_.begin() + (j + 1) * d, Mat(0));
      }
    }
    transpose_keys();
    if constexpr (kVnni) pack_tile();
    return valid < cols_ || newest > r0;
  }

  void copy_row(const In* src, Mat* dst) const {
    if constexpr (std::is_same_v<In, Mat>) {
      std::memcpy(dst, src, p_.d * sizeof(Mat));
    } else {
      for (int64_t c = 0; c < p_.d; ++c) dst[c] = to_mat<Mat>(src[c]);
    }
  }

  // kt_ (d x cols) = k_rows_ (cols x d) transposed, in the vector tiles ATen provides (32 x 32 at most for bf16).
  void transpose_keys() {
    const int64_t d = p_.d;
    if constexpr (kVnni) {
      for (int64_t j0 = 0; j0 < cols_; j0 += 32)
        for (int64_t c0 = 0; c0 < d; c0 += 32)
          at::vec::transpose_mxn<at::BFloat16>(k_rows_.data() + j0 * d + c0, d, kt_.data() + c0 * cols_ + j0, cols_,
                                               std::min<int64_t>(32, cols_ - j0), std::min<int64_t>(32, d - c0));
    } else {
      at::vec::transpose_mxn<float>(k_rows_.data(), d, kt_.data(), cols_, cols_, d);
    }
  }

  void pack_tile() {
    const int64_t d = p_.d;
    for (int64_t j0 = 0; j0 < cols_; j0 += kPackWidth) {
      const int64_t w = std::min(kPackWidth, cols_ - j0);
      blas::pack(d, w, cols_, w, at::kBFloat16, at::kBFloat16, kt_.data() + j0, kt_packed_.data() + j0 * d);
    }
    for (int64_t c0 = 0; c0 < d; c0 += kPackWidth) {
      const int64_t w = std::min(kPackWidth, d - c0);
      blas::pack(cols_, w, d, w, at::kBFloat16, at::kBFloat16, v_.data() + c0, v_packed_.data() + c0 * cols_);
    }
  }

  // s = q_t . K^T, unscaled (bs x cols).
  void scores(int64_t t) {
    const int64_t bs = p_.bs, d = p_.d;
    const Mat* q = q_.data() + t * bs * d;
    if constexpr (kVnni) {
      for (int64_t j0 = 0; j0 < cols_; j0 += kPackWidth) {
        const int64_t w = std::min(kPackWidth, cols_ - j0);
        blas::brgemm(bs, w, d, d, w, cols_, false, q, kt_packed_.data() + j0 * d, s_.data() + j0, true);
      }
    } else {
      blas::brgemm(bs, cols_, d, d, cols_, cols_, false, q, kt_.data(), s_.data(), false);
    }
  }

  // Online softmax over this tile for the rows of head t: p = exp(scale * s - m_new) into the probability
  // tile, running sums rescaled; alpha = exp(m_old - m_new) rescales the accumulator in accumulate().
  void softmax_step(int64_t t, int64_t rows, bool masked) {
    const int64_t bs = p_.bs;
    float* m = m_.data() + t * bs;
    float* l = l_.data() + t * bs;
    for (int64_t i = 0; i < bs; ++i) {
      float* s = s_.data() + i * cols_;
      Mat* prob = probabilities(i);
      alpha_[i] = 1.f;
      if (i >= rows) {
        std::fill(prob, prob + cols_, Mat(0));
        continue;
      }
      if (masked) hide_future_keys(s, i);
      const float tile_max =
          at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, cols_);
      const float m_new = std::max(m[i], tile_max * p_.scale);
      if (m_new == kNegInf) {  // nothing visible to this row yet
        std::fill(prob, prob + cols_, Mat(0));
        continue;
      }
      alpha_[i] = std::exp(m[i] - m_new);
      l[i] = l[i] * alpha_[i] + exponentiate(s, prob, m_new);
      m[i] = m_new;
    }
  }

  // s[j] = -inf where row i precedes the key (i < first_row_[j]); row i holds token r0 + i.
  void hide_future_keys(float* s, int64_t i) const {
    const Vec row(static_cast<float>(i)), hidden(kNegInf);
    for (int64_t j = 0; j < cols_; j += Vec::size()) {
      const Vec x = Vec::loadu(s + j);
      Vec::blendv(x, hidden, Vec::loadu(first_row_.data() + j) > row).store(s + j);
    }
  }

  Mat* probabilities(int64_t i) {
    if constexpr (kVnni) {
      return p_mat_.data() + i * cols_;
    } else {
      return s_.data() + i * cols_;  // float32 path: probabilities overwrite the scores in place
    }
  }

  // prob[j] = exp(scale * s[j] - m) (exp(-inf) = 0 for masked keys); returns the float32 sum. cols_ is a
  // multiple of bs, a power of two >= 16: whole float vectors.
  float exponentiate(const float* s, Mat* prob, float m) {
    const int64_t width = Vec::size();
    const Vec vscale(p_.scale), vm(m);
    Vec acc(0.f);
    for (int64_t j = 0; j < cols_; j += 2 * width) {
      const Vec lo = (Vec::loadu(s + j) * vscale - vm).exp_u20();
      const bool pair = j + width < cols_;
      const Vec hi = pair ? (Vec::loadu(s + j + width) * vscale - vm).exp_u20() : Vec(0.f);
      acc = acc + lo + hi;
      if constexpr (kVnni) {
        store_bf16(lo, hi, prob + j, pair);
      } else {
        lo.store(prob + j);
        if (pair) hi.store(prob + j + width);
      }
    }
    return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  }

  // Rounds 16 or 32 floats to bfloat16 (nearest even): one instruction where the CPU has AVX512-BF16.
  static void store_bf16(const Vec& lo, const Vec& hi, at::BFloat16* dst, bool pair) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if (pair) {
      _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(__m512(lo)));
    }
#else
    at::vec::convert_from_float<at::BFloat16>(lo, hi).store(dst, pair ? 2 * Vec::size() : Vec::size());
#endif
  }

  // o_t = alpha * o_t + prob . V, row by row (the rescale fused into the pass that adds the product).
  void accumulate(int64_t t, int64_t rows) {
    const int64_t bs = p_.bs, d = p_.d;
    float* pv = pv_.data();
    if constexpr (kVnni) {
      for (int64_t c0 = 0; c0 < d; c0 += kPackWidth) {
        const int64_t w = std::min(kPackWidth, d - c0);
        blas::brgemm(bs, w, cols_, cols_, w, d, false, p_mat_.data(), v_packed_.data() + c0 * cols_, pv + c0, true);
      }
    } else {
      blas::brgemm(bs, d, cols_, cols_, d, d, false, s_.data(), v_.data(), pv, false);
    }
    float* o = o_.data() + t * bs * d;
    for (int64_t i = 0; i < rows; ++i) {
      const Vec alpha(alpha_[i]);
      at::vec::map2([alpha](Vec x, Vec y) { return x * alpha + y; }, o + i * d, o + i * d, pv + i * d, d);
    }
  }

  void store(const Task& task, int64_t r0, int64_t rows) {
    const int64_t bs = p_.bs, d = p_.d;
    for (int64_t t = 0; t < task.heads; ++t) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t token = ((task.batch * p_.hq) + task.head0 + t) * p_.n + r0 + i;
        const float l = l_[t * bs + i];
        const float* o = o_.data() + (t * bs + i) * d;
        In* dst = p_.out + token * d;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<In>(o[c] * inv);
        p_.lse[token] = l > 0.f ? m_[t * bs + i] + std::log(l) : kNegInf;
      }
    }
  }
};

template <typename In>
std::vector<Task> make_tasks(const Problem<In>& p, int64_t batch) {
  const int64_t group = p.hq / p.hkv;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < p.hkv; ++h)
      for (int64_t head0 = h * group; head0 < (h + 1) * group; head0 += kHeadTile)
        for (int64_t i = 0; i < p.nb; ++i) {
          const int64_t heads = std::min(kHeadTile, (h + 1) * group - head0);
          const int64_t first = (b * p.hq + head0) * p.nb + i, last = (b * p.hq + head0 + heads - 1) * p.nb + i;
          int64_t cost = 0;
          for (int64_t row = first; row <= last; row += p.nb) cost += p.offsets[row + 1] - p.offsets[row];
          tasks.push_back({b, h, i, head0, heads, cost});
        }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

template <typename In, typename Mat>
void run_tasks(const Problem<In>& p, const std::vector<Task>& tasks) {
  std::atomic<size_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Worker<In, Mat> worker(p);
    for (size_t i = next.fetch_add(1); i < tasks.size(); i = next.fetch_add(1)) worker.run(tasks[i]);
    if constexpr (std::is_same_v<Mat, at::BFloat16>) blas::brgemm_release(true);
  });
}

std::tuple<at::Tensor, at::Tensor> pbs_block_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& perm,
                                                          const at::Tensor& offsets, const at::Tensor& indices,
                                                          int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pbs_block_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "pbs_block_attention: q, k, v must share one dtype");
  TORCH_CHECK(block_size >= 1, "pbs_block_attention: block_size must be positive, got ", block_size);
  TORCH_CHECK(perm.scalar_type() == at::kInt && offsets.scalar_type() == at::kLong &&
                  indices.scalar_type() == at::kInt,
              "pbs_block_attention: perm and indices must be int32, offsets int64");
  const int64_t batch = q.size(0), hq = q.size(1), n = q.size(2), d = q.size(3), hkv = k.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "pbs_block_attention: Hq must be a multiple of Hkv");
  const int64_t nb = (n + block_size - 1) / block_size;
  TORCH_CHECK(offsets.numel() == batch * hq * nb + 1, "pbs_block_attention: offsets must have B*Hq*nb+1 entries");
  auto qc = q.stride(3) == 1 ? q : q.contiguous();
  auto kc = k.stride(3) == 1 ? k : k.contiguous();
  auto vc = v.stride(3) == 1 ? v : v.contiguous();
  auto perm_c = perm.contiguous();
  auto offsets_c = offsets.contiguous();
  auto indices_c = indices.contiguous();
  auto out = at::empty({batch, hq, n, d}, q.options());
  auto lse = at::empty({batch, hq, n}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  auto launch = [&](auto typed_zero) {
    using In = decltype(typed_zero);
    const Problem<In> p{hq, hkv, n, d, block_size, nb, static_cast<float>(scale),
                        qc.const_data_ptr<In>(), kc.const_data_ptr<In>(), vc.const_data_ptr<In>(),
                        strides_of(qc), strides_of(kc), strides_of(vc), perm_c.const_data_ptr<int32_t>(),
                        offsets_c.const_data_ptr<int64_t>(), indices_c.const_data_ptr<int32_t>(),
                        out.mutable_data_ptr<In>(), lse.mutable_data_ptr<float>()};
    const auto tasks = make_tasks(p, batch);
    if constexpr (std::is_same_v<In, at::BFloat16>) {
      if (blas::could_pack(at::kBFloat16)) return run_tasks<In, at::BFloat16>(p, tasks);
    }
    run_tasks<In, float>(p, tasks);
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      launch(float{});
      break;
    case at::kBFloat16:
      launch(at::BFloat16{});
      break;
    case at::kHalf:
      launch(at::Half{});
      break;
    default:
      TORCH_CHECK(false, "pbs_block_attention: q must be float32, bfloat16 or float16, got ", q.scalar_type());
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) { m.impl("pbs_block_attention", &pbs_block_attention_cpu); }
