// CPU kernels of the PBS-Attn plan (docs/PRIMITIVES.md "Attention"; reference: pykernels/reference/attention.py):
// pbs_permutation and pbs_select_blocks. Both compute in float64 and return integers that equal the reference's
// whenever the data has no float64 near-ties: every float64 value differs from the reference's by round-off
// only (a few ulps: dot products use FMA like the reference's BLAS, exp is our own polynomial within 1 ulp,
// sums run in another order).
//
// q and k are read through their batch/head/token strides (last dim contiguous), one token row at a time,
// converted exactly to float64 into small buffers; no whole-tensor copy is made.
//
// pbs_permutation. The R = group * bs query rows of a kv head (the last bs tokens of each query head of its
// group) are split into row blocks of at most kRowBlock rows; row blocks are independent tasks (one parallel
// region). A task keeps the float64 logits of its rows against the G*S keys in a (keys, rows) buffer and walks
// the keys in groups of whole segments (about kKeyChunk keys):
//   1. logits l[j][r] = dot(q_r, k_j) * scale: keys converted kKeyChunk rows at a time, a register-tiled
//      micro-kernel (16 rows x 12 keys, FMAs in ascending d),
//   2. while the group is in cache: its row maxima m_g, e[j][r] = exp(l[j][r] - m_g[r]) in place, row sums s_g.
// Then per row m = max_g m_g, s = sum_g s_g exp(m_g - m), factor_g = exp(m_g - m) / s, and the block's mass of
// key j is sum_r e[j][r] * factor_g(j)[r] (= sum_r softmax(l[r, :])[j]). The masses of a kv head's row blocks
// are summed in block order and divided by R; each full segment is sorted by a stable descending sort.
// Block sizes are constants, never derived from the thread count, so the result is the same for any number of
// threads; every key of a segment goes through the same operations in the same order (one group holds whole
// segments), so equal keys get bit-equal masses and keep their index order, as in the reference.
// Memory per thread: the logits buffer (kRowBlock x G*S doubles, 4 MiB at N = 16384) and a 384-row float64
// chunk of k; per call, ceil(R / kRowBlock) x G*S doubles of row-block masses per kv head.
//
// pbs_select_blocks. Block means in float64 (query blocks of every head, key blocks read through perm), in
// parallel over (batch, block); then per (batch, query head) in parallel: block scores and the selection of
// every query block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 32;   // query rows whose logits against all keys are kept at once
constexpr int64_t kTileRows = 16;   // micro-kernel: 16 rows (two 8-double vectors) ...
constexpr int64_t kTileKeys = 12;   // ... x 12 keys: 24 accumulators
constexpr int64_t kKeyChunk = 384;  // keys converted to float64 at once: a multiple of kTileKeys and of 16
constexpr int64_t kLanes = 8;       // partial sums of the fixed-order reductions (one 8-double vector)
constexpr int64_t kPrefetchRows = 8;  // token rows of k requested ahead of their conversion

// ------------------------------------------------------------------------------------------------------------
// Parallel tasks

// Runs fn(task, worker_state) for task in [0, count) on the intra-op pool, handing tasks out one at a time (the
// tasks are long, and a static split waits for the slowest thread, e.g. one that shares its core); each thread
// makes one worker_state = make_state() for the tasks it runs. Results may depend on the task only.
template <typename MakeState, typename Fn>
void for_each_task(int64_t count, const MakeState& make_state, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next++; task < count; task = next++) fn(task, state);
  });
}

template <typename Fn>
void for_each_task(int64_t count, const Fn& fn) {
  for_each_task(count, [] { return 0; }, [&](int64_t task, int) { fn(task); });
}

// ------------------------------------------------------------------------------------------------------------
// Inputs

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A (B, H, N, D) tensor read one token row at a time as float64, through its strides.
class TokenRows {
 public:
  explicit TokenRows(const at::Tensor& t)
      : data_(static_cast<const char*>(t.data_ptr())),
        dtype_(t.scalar_type()),
        item_(t.element_size()),
        batch_stride_(t.stride(0)),
        head_stride_(t.stride(1)),
        token_stride_(t.stride(2)),
        dim_(t.size(3)) {}

  int64_t dim() const { return dim_; }

  // Asks for row (b, h, token) in cache ahead of its load (rows of a strided layout defeat the prefetchers).
  void prefetch(int64_t b, int64_t h, int64_t token) const {
    const char* row = data_ + (b * batch_stride_ + h * head_stride_ + token * token_stride_) * item_;
    for (int64_t offset = 0; offset < dim_ * item_; offset += 64) __builtin_prefetch(row + offset);
  }

  // dst[d] = float64(x[b, h, token, d]), d < D (exact conversion).
  void load(int64_t b, int64_t h, int64_t token, double* __restrict dst) const {
    const char* row = data_ + (b * batch_stride_ + h * head_stride_ + token * token_stride_) * item_;
    constexpr int64_t kPiece = 64;
    alignas(64) float tmp[kPiece];
    for (int64_t d0 = 0; d0 < dim_; d0 += kPiece) {
      const int64_t len = std::min(kPiece, dim_ - d0);
      const float* x = as_float(row + d0 * item_, len, tmp);
      for (int64_t d = 0; d < len; ++d) dst[d0 + d] = static_cast<double>(x[d]);
    }
  }

 private:
  const float* as_float(const char* src, int64_t len, float* tmp) const {
    switch (dtype_) {
      case at::kFloat:
        return reinterpret_cast<const float*>(src);
      case at::kBFloat16:
        bf16_to_float(reinterpret_cast<const uint16_t*>(src), len, tmp);
        return tmp;
      default:  // at::kHalf (validated by the op)
        half_to_float(reinterpret_cast<const uint16_t*>(src), len, tmp);
        return tmp;
    }
  }

  const char* data_;
  at::ScalarType dtype_;
  int64_t item_, batch_stride_, head_stride_, token_stride_, dim_;
};

struct Shapes {
  int64_t batch, hq, hkv, n, d;
  int64_t group() const { return hq / hkv; }
};

Shapes checked_qk(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t segment_size,
                  const char* op) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), op, ": q and k must be on cpu (got ", q.device(), ", ",
              k.device(), ")");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be 4-D (B, H, N, D), got shapes ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()) && k.scalar_type() == q.scalar_type(), op,
              ": q and k must share one dtype among float32, bfloat16, float16 (got ", q.scalar_type(), ", ",
              k.scalar_type(), ")");
  const Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.batch && k.size(2) == s.n && k.size(3) == s.d, op,
              ": k must be (B, Hkv, N, D) with q's B, N, D; got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(s.hkv > 0 && s.hq % s.hkv == 0, op, ": q heads (", s.hq, ") must be a multiple of k heads (", s.hkv,
              ")");
  TORCH_CHECK((q.stride(3) == 1 || s.d <= 1) && (k.stride(3) == 1 || s.d <= 1), op,
              ": the last dim of q and k must be contiguous");
  TORCH_CHECK(block_size >= 16 && (block_size & (block_size - 1)) == 0, op,
              ": block_size must be a power of two >= 16 (got ", block_size, ")");
  TORCH_CHECK(segment_size > 0 && segment_size % block_size == 0, op, ": segment_size must be a positive multiple "
              "of block_size (got ", segment_size, ")");
  return s;
}

// ------------------------------------------------------------------------------------------------------------
// Float64 helpers

inline uint64_t double_bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline double bits_double(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// exp(x) for x <= 0 (NaN propagates), within 1 ulp (measured against glibc over [-760, 0]). x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite split of ln2, so n ln2_hi is exact), exp(r) by its degree-13 Taylor polynomial
// (truncation < 1e-17 relative), times 2^n: exact for normal results; below 2^-1020 in two steps, so that a
// subnormal result is rounded once, like ldexp and vscalefpd (the vector version gives the same bits).
constexpr double kExpFloor = -746.0;  // exp(-746) rounds to 0
constexpr double kLog2e = 0x1.71547652b82fep0;
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kRound = 0x1.8p52;  // adding it rounds |v| < 2^51 to an integer held in the low bits
constexpr double kExpTaylor[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                   1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                                   1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                                   1.0,                1.0};  // 1/13!, ..., 1/0!

inline double exp_nonpositive(double x) {
  const double xc = x < kExpFloor ? kExpFloor : x;
  const double t = xc * kLog2e + kRound;
  const double n = t - kRound;
  const double r = (xc - n * kLn2Hi) - n * kLn2Lo;
  double p = kExpTaylor[0];
  for (int i = 1; i < 14; ++i) p = std::fma(p, r, kExpTaylor[i]);
  const int64_t e = static_cast<int64_t>(double_bits(t) - double_bits(kRound));  // n, in [-1077, 0]
  const bool tiny = e < -1020;
  const double pow2 = bits_double(static_cast<uint64_t>((tiny ? e + 64 : e) + 1023) << 52);
  return (p * pow2) * (tiny ? 0x1p-64 : 1.0);
}

#if defined(PK_AVX512)
// exp_nonpositive of kVecs x 8 lanes, the same operations (vmaxpd returns its second operand, x, for a NaN).
// The vectors' polynomial chains are interleaved: one chain alone is latency bound.
template <int kVecs>
inline void exp_nonpositive8(__m512d* x) {
  __m512d n[kVecs], r[kVecs], p[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const __m512d xc = _mm512_max_pd(_mm512_set1_pd(kExpFloor), x[v]);
    const __m512d t = _mm512_add_pd(_mm512_mul_pd(xc, _mm512_set1_pd(kLog2e)), _mm512_set1_pd(kRound));
    n[v] = _mm512_sub_pd(t, _mm512_set1_pd(kRound));
    r[v] = _mm512_sub_pd(_mm512_sub_pd(xc, _mm512_mul_pd(n[v], _mm512_set1_pd(kLn2Hi))),
                         _mm512_mul_pd(n[v], _mm512_set1_pd(kLn2Lo)));
    p[v] = _mm512_set1_pd(kExpTaylor[0]);
  }
  for (int i = 1; i < 14; ++i) {
    for (int v = 0; v < kVecs; ++v) p[v] = _mm512_fmadd_pd(p[v], r[v], _mm512_set1_pd(kExpTaylor[i]));
  }
  for (int v = 0; v < kVecs; ++v) x[v] = _mm512_scalef_pd(p[v], n[v]);
}
#endif

// sum_i a[i] * b[i] in a fixed order: kLanes interleaved partial sums, then a fixed tree (vectorises).
inline double dot_lanes(const double* __restrict a, const double* __restrict b, int64_t n) {
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[i + l] * b[i + l];
  }
  for (int64_t l = 0; i < n; ++i, ++l) lane[l] += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Descending order with NaN first (torch.sort(descending=True) puts NaN above everything).
inline bool before_descending(double a, double b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// ------------------------------------------------------------------------------------------------------------
// pbs_permutation: logits micro-kernel

// A slab of kTileRows query rows is packed as (dim, kTileRows), so that the micro-kernel reads it sequentially;
// keys stay rows of the float64 chunk.

// out[j * out_stride + r] = scale * sum_d slab[d][r] * keys[j][d] for r < kTileRows, j < kKeys: fused
// multiply-adds in ascending d from 0, then one multiply by scale.
template <int kKeys>
void logits_tile(const double* __restrict slab, const double* __restrict keys, int64_t dim, double scale,
                 double* __restrict out, int64_t out_stride) {
#if defined(PK_AVX512)
  __m512d acc[kKeys][2];
  for (int j = 0; j < kKeys; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_pd();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512d q0 = _mm512_loadu_pd(slab + d * kTileRows);
    const __m512d q1 = _mm512_loadu_pd(slab + d * kTileRows + 8);
    for (int j = 0; j < kKeys; ++j) {
      const __m512d kj = _mm512_set1_pd(keys[j * dim + d]);
      acc[j][0] = _mm512_fmadd_pd(q0, kj, acc[j][0]);
      acc[j][1] = _mm512_fmadd_pd(q1, kj, acc[j][1]);
    }
  }
  const __m512d s = _mm512_set1_pd(scale);
  for (int j = 0; j < kKeys; ++j) {
    _mm512_storeu_pd(out + j * out_stride, _mm512_mul_pd(acc[j][0], s));
    _mm512_storeu_pd(out + j * out_stride + 8, _mm512_mul_pd(acc[j][1], s));
  }
#else
  for (int j = 0; j < kKeys; ++j) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      double acc = 0.0;
      for (int64_t d = 0; d < dim; ++d) acc = std::fma(slab[d * kTileRows + r], keys[j * dim + d], acc);
      out[j * out_stride + r] = acc * scale;
    }
  }
#endif
}

// The logits of `rows` packed query rows (rows / kTileRows slabs) against `count` keys (keys: (count, dim),
// count a multiple of 4) into out: (count, rows).
void logits_block(const double* slabs, int64_t rows, const double* keys, int64_t count, int64_t dim, double scale,
                  double* out) {
  TORCH_INTERNAL_ASSERT(count % 4 == 0 && rows % kTileRows == 0, "logits_block: ", count, " keys, ", rows, " rows");
  for (int64_t j = 0; j < count; j += kTileKeys) {
    const double* group = keys + j * dim;
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const double* slab = slabs + r * dim;
      double* dst = out + j * rows + r;
      switch (std::min(kTileKeys, count - j)) {
        case kTileKeys:
          logits_tile<kTileKeys>(slab, group, dim, scale, dst, rows);
          break;
        case 8:
          logits_tile<8>(slab, group, dim, scale, dst, rows);
          break;
        default:  // 4
          logits_tile<4>(slab, group, dim, scale, dst, rows);
          break;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// pbs_permutation: key mass

// The work of one row block: query rows [row0, row0 + rows) of the R = group * block_size rows of (b, kv_head).
struct RowBlock {
  int64_t b, kv_head, row0, rows;
};

struct MassProblem {
  const TokenRows* q;
  const TokenRows* k;
  int64_t hkv, group, block_size, segment_size, n;
  int64_t full;  // G * S: the keys of the full segments
  double scale;

  int64_t total_rows() const { return group * block_size; }
  int64_t block_rows() const { return std::min(kRowBlock, total_rows()); }  // a multiple of kTileRows
  int64_t blocks_per_head() const { return (total_rows() + block_rows() - 1) / block_rows(); }

  // Task t: row block t % blocks_per_head() of kv head t / blocks_per_head() (batch-major).
  RowBlock row_block(int64_t task) const {
    const int64_t per_head = blocks_per_head(), head = task / per_head;
    const int64_t row0 = task % per_head * block_rows();
    return {head / hkv, head % hkv, row0, std::min(block_rows(), total_rows() - row0)};
  }
};

// Buffers of one thread, reused by its row blocks.
// Pages straight from mmap, unmapped when the call ends: the logits buffer (MiBs per thread) would otherwise stay
// resident after the call (the allocator keeps freed heap memory, ThreadScratch keeps its buffers on purpose).
class MappedBuffer {
 public:
  explicit MappedBuffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    data_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(data_ != MAP_FAILED, "pbs_permutation: cannot map ", bytes_, " bytes of scratch memory");
  }
  ~MappedBuffer() { munmap(data_, bytes_); }
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  size_t bytes_;
  void* data_;
};

struct MassScratch {
  explicit MassScratch(const MassProblem& p)
      : logits(static_cast<size_t>(p.full * p.block_rows()) * sizeof(double)),
        slabs(kCountSlot, static_cast<size_t>(p.q->dim() * p.block_rows()) * sizeof(double)),
        keys(kChunkSlot, static_cast<size_t>(kKeyChunk * p.k->dim()) * sizeof(double)) {}
  MappedBuffer logits;   // (full, rows)
  ThreadScratch slabs;   // the block's query rows, packed
  ThreadScratch keys;    // (kKeyChunk, dim): a chunk of k in float64
};

// The block's query rows as packed slabs: row r at slabs[(r / kTileRows * dim + d) * kTileRows + r % kTileRows]
// (float64). Row i of the R rows is token N - block_size + i % block_size of query head
// kv_head * group + i / block_size.
void load_query_block(const MassProblem& p, const RowBlock& blk, double* slabs) {
  const int64_t dim = p.q->dim();
  std::vector<double> row(dim);
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.row0 + r;
    const int64_t head = blk.kv_head * p.group + i / p.block_size;
    p.q->load(blk.b, head, p.n - p.block_size + i % p.block_size, row.data());
    double* dst = slabs + (r / kTileRows * dim) * kTileRows + r % kTileRows;
    for (int64_t d = 0; d < dim; ++d) dst[d * kTileRows] = row[d];
  }
}

// Keys are processed in groups of whole segments (about kKeyChunk keys, or one segment): the exps of a group
// run while its logits are still in cache, relative to the group's row maxima, and a (group, row) factor turns
// them into the row's softmax afterwards. A segment never spans two groups, so equal keys of one segment get
// bit-equal masses.
int64_t keys_per_group(int64_t segment_size) { return segment_size * std::max<int64_t>(1, kKeyChunk / segment_size); }

// logits (count, rows) of the block against keys [j0, j0 + count), chunk by chunk of k converted into the
// float64 buffer `keys` (kKeyChunk rows), and their row maxima.
void group_logits(const MassProblem& p, const RowBlock& blk, const double* slabs, int64_t j0, int64_t count,
                  double* keys, double* logits, double* max) {
  const int64_t dim = p.k->dim(), rows = blk.rows;
  std::fill(max, max + rows, -std::numeric_limits<double>::infinity());
  for (int64_t c0 = 0; c0 < count; c0 += kKeyChunk) {
    const int64_t chunk = std::min(kKeyChunk, count - c0);
    for (int64_t j = 0; j < chunk; ++j) {
      if (j + kPrefetchRows < count - c0) p.k->prefetch(blk.b, blk.kv_head, j0 + c0 + j + kPrefetchRows);
      p.k->load(blk.b, blk.kv_head, j0 + c0 + j, keys + j * dim);
    }
    double* out = logits + c0 * rows;
    logits_block(slabs, rows, keys, chunk, dim, p.scale, out);
    for (int64_t j = 0; j < chunk; ++j) {
      const double* l = out + j * rows;
      for (int64_t r = 0; r < rows; ++r) max[r] = l[r] > max[r] ? l[r] : max[r];
    }
  }
}

#if defined(PK_AVX512)
// e = exp(l - row_max) in place and sum += e, for kVecs x 8 rows.
template <int kVecs>
inline void exp_rows(double* __restrict l, const double* __restrict row_max, double* __restrict sum) {
  __m512d e[kVecs];
  for (int v = 0; v < kVecs; ++v) e[v] = _mm512_sub_pd(_mm512_loadu_pd(l + 8 * v), _mm512_loadu_pd(row_max + 8 * v));
  exp_nonpositive8<kVecs>(e);
  for (int v = 0; v < kVecs; ++v) {
    _mm512_storeu_pd(l + 8 * v, e[v]);
    _mm512_storeu_pd(sum + 8 * v, _mm512_add_pd(_mm512_loadu_pd(sum + 8 * v), e[v]));
  }
}
#endif

// e = exp(l - row_max) in place and the row sums (ascending keys).
void exp_pass(double* __restrict logits, int64_t count, int64_t rows, const double* __restrict row_max,
              double* __restrict sum) {
  std::fill(sum, sum + rows, 0.0);
  for (int64_t j = 0; j < count; ++j) {
    double* l = logits + j * rows;
    int64_t r = 0;
#if defined(PK_AVX512)
    for (; r + 32 <= rows; r += 32) exp_rows<4>(l + r, row_max + r, sum + r);
    for (; r + 8 <= rows; r += 8) exp_rows<1>(l + r, row_max + r, sum + r);
#endif
    for (; r < rows; ++r) {
      const double e = exp_nonpositive(l[r] - row_max[r]);
      l[r] = e;
      sum[r] += e;
    }
  }
}

// factor[g][r] = exp(group_max[g][r] - max_r) / sum_r with max_r = max_g group_max[g][r] and
// sum_r = sum_g group_sum[g][r] * exp(group_max[g][r] - max_r) (groups in order): e * factor = softmax.
void softmax_factors(const std::vector<double>& group_max, const std::vector<double>& group_sum, int64_t rows,
                     std::vector<double>& factor) {
  const int64_t groups = static_cast<int64_t>(group_max.size()) / rows;
  std::vector<double> row_max(rows, -std::numeric_limits<double>::infinity()), sum(rows, 0.0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < rows; ++r) row_max[r] = std::max(row_max[r], group_max[g * rows + r]);
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < rows; ++r) {
      factor[g * rows + r] = exp_nonpositive(group_max[g * rows + r] - row_max[r]);
      sum[r] += group_sum[g * rows + r] * factor[g * rows + r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) sum[r] = 1.0 / sum[r];
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < rows; ++r) factor[g * rows + r] *= sum[r];
  }
}

// mass[j] = sum_r softmax(l[r, :])[j] over the block's rows, j < full: sum_r e[j][r] * factor[g(j)][r] in the
// same order for every key.
void row_block_mass(const MassProblem& p, const RowBlock& blk, const MassScratch& scratch, double* mass) {
  const int64_t rows = blk.rows;
  const int64_t per_group = keys_per_group(p.segment_size), groups = (p.full + per_group - 1) / per_group;
  double* logits = scratch.logits.as<double>();
  double* slabs = scratch.slabs.as<double>();
  std::vector<double> group_max(groups * rows), group_sum(groups * rows), factor(groups * rows);
  load_query_block(p, blk, slabs);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t j0 = g * per_group, count = std::min(per_group, p.full - j0);
    double* l = logits + j0 * rows;
    group_logits(p, blk, slabs, j0, count, scratch.keys.as<double>(), l, group_max.data() + g * rows);
    exp_pass(l, count, rows, group_max.data() + g * rows, group_sum.data() + g * rows);
  }
  softmax_factors(group_max, group_sum, rows, factor);
  for (int64_t j = 0; j < p.full; ++j) {
    mass[j] = dot_lanes(logits + j * rows, factor.data() + j / per_group * rows, rows);
  }
}

// perm[c] for the full segment starting at `start`: the segment's keys by mass (the sum of the row blocks'
// masses, in block order, over R), descending, ties by lower index.
void sort_segment(const MassProblem& p, const double* block_mass, int64_t start, int64_t segment_size,
                  int32_t* perm) {
  std::vector<double> mass(segment_size, 0.0);
  const double divisor = static_cast<double>(p.total_rows());
  for (int64_t blk = 0; blk < p.blocks_per_head(); ++blk) {
    const double* m = block_mass + blk * p.full + start;
    for (int64_t i = 0; i < segment_size; ++i) mass[i] += m[i];
  }
  for (int64_t i = 0; i < segment_size; ++i) mass[i] /= divisor;
  int32_t* out = perm + start;
  std::iota(out, out + segment_size, 0);
  std::stable_sort(out, out + segment_size,
                   [&](int32_t a, int32_t b) { return before_descending(mass[a], mass[b]); });
  for (int64_t i = 0; i < segment_size; ++i) out[i] += static_cast<int32_t>(start);
}

at::Tensor pbs_permutation(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t segment_size,
                           double scale) {
  const char* op = "pykernels::pbs_permutation";
  const Shapes s = checked_qk(q, k, block_size, segment_size, op);
  TORCH_CHECK(s.n < std::numeric_limits<int32_t>::max(), op, ": N must be below 2^31 (got ", s.n, ")");
  at::Tensor perm = at::arange(s.n, q.options().dtype(at::kInt)).repeat({s.batch, s.hkv, 1});
  if (s.n <= segment_size || s.batch == 0 || s.hq == 0) return perm;
  const TokenRows q_rows(q), k_rows(k);
  const MassProblem p{&q_rows, &k_rows, s.hkv, s.group(), block_size, segment_size, s.n,
                      s.n / segment_size * segment_size, scale};
  // Row blocks are independent tasks (one parallel region), each writing its masses into its own row of
  // block_mass: ceil(R / kRowBlock) rows of G*S doubles per kv head, 8 / (D * itemsize) of k's size per row.
  const int64_t heads = s.batch * s.hkv, per_head = p.blocks_per_head(), segments = p.full / segment_size;
  std::vector<double> block_mass(heads * per_head * p.full);
  for_each_task(heads * per_head, [&] { return std::make_unique<MassScratch>(p); },
                [&](int64_t t, const std::unique_ptr<MassScratch>& scratch) {
                  row_block_mass(p, p.row_block(t), *scratch, block_mass.data() + t * p.full);
                });
  int32_t* perm_data = perm.data_ptr<int32_t>();
  at::parallel_for(0, heads * segments, 1, [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const int64_t head = t / segments;
      sort_segment(p, block_mass.data() + head * per_head * p.full, t % segments * segment_size, segment_size,
                   perm_data + head * s.n);
    }
  });
  return perm;
}

// ------------------------------------------------------------------------------------------------------------
// pbs_select_blocks

int64_t block_count(int64_t n, int64_t block_size) { return (n + block_size - 1) / block_size; }

struct SelectParams {
  Shapes s;
  int64_t nb, block_size, segment_size;
  double threshold, scale;
  bool force_first_block;
};

// Float64 block means: pooled_q (B, Hq, nb, D) of the query blocks, pooled_k (B, Hkv, nb, D) of the permuted key
// blocks, and first (B, Hkv, nb) = min(perm over each key block).
struct PooledBlocks {
  std::vector<double> q, k;
  std::vector<int32_t> first;
};

// Adds row (b, h, token) to sum (dim) in float64.
void add_row(const TokenRows& x, int64_t b, int64_t h, int64_t token, double* row, double* sum) {
  x.load(b, h, token, row);
  for (int64_t d = 0; d < x.dim(); ++d) sum[d] += row[d];
}

void divide(double* values, int64_t dim, int64_t length) {
  const double l = static_cast<double>(length);
  for (int64_t d = 0; d < dim; ++d) values[d] /= l;
}

// Block i of every head of batch b: means summed in ascending row order, divided by the true row count. For a
// query block the heads are the inner loop, so that a (B, N, H, D) layout is read row after row.
void pool_block(const SelectParams& p, const TokenRows& q, const TokenRows& k, const int32_t* perm, int64_t b,
                int64_t i, double* row, PooledBlocks& out, const char* op) {
  const int64_t dim = q.dim(), n = p.s.n, c0 = i * p.block_size, c1 = std::min(n, c0 + p.block_size);
  double* pq = out.q.data() + (b * p.s.hq * p.nb + i) * dim;  // head h at pq + h * nb * dim
  for (int64_t h = 0; h < p.s.hq; ++h) std::fill(pq + h * p.nb * dim, pq + (h * p.nb + 1) * dim, 0.0);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t h = 0; h < p.s.hq; ++h) add_row(q, b, h, c, row, pq + h * p.nb * dim);
  }
  for (int64_t h = 0; h < p.s.hq; ++h) divide(pq + h * p.nb * dim, dim, c1 - c0);
  for (int64_t h = 0; h < p.s.hkv; ++h) {
    const int64_t bh = b * p.s.hkv + h;
    const int32_t* order = perm + bh * n;
    double* pk = out.k.data() + (bh * p.nb + i) * dim;
    int32_t first = std::numeric_limits<int32_t>::max();
    std::fill(pk, pk + dim, 0.0);
    for (int64_t c = c0; c < c1; ++c) {
      TORCH_CHECK(order[c] >= 0 && order[c] < n, op, ": perm values must lie in [0, N) (got ", order[c], ")");
      first = std::min(first, order[c]);
      add_row(k, b, h, order[c], row, pk);
    }
    divide(pk, dim, c1 - c0);
    out.first[bh * p.nb + i] = first;
  }
}

// keep[j] = true for the shortest prefix of candidates j < count by descending softmax(scores) (ties: lower j)
// whose running sum reaches threshold (all if it never does); none if threshold <= 0, all if >= 1.
void keep_by_mass(const double* scores, int64_t count, double threshold, std::vector<int32_t>& order,
                  std::vector<double>& probs, uint8_t* keep) {
  if (count == 0 || threshold <= 0.0) return;
  if (threshold >= 1.0) {
    std::fill(keep, keep + count, 1);
    return;
  }
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < count; ++j) max = std::max(max, scores[j]);
  double sum = 0.0;
  for (int64_t j = 0; j < count; ++j) {
    probs[j] = exp_nonpositive(scores[j] - max);
    sum += probs[j];
  }
  const double inverse = 1.0 / sum;  // softmax = e * (1 / sum), as torch's CPU softmax
  for (int64_t j = 0; j < count; ++j) probs[j] *= inverse;
  std::iota(order.begin(), order.begin() + count, 0);
  std::stable_sort(order.begin(), order.begin() + count,
                   [&](int32_t a, int32_t b) { return before_descending(probs[a], probs[b]); });
  int64_t kept = count;  // round-off short of the threshold: keep all
  double running = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    running += probs[order[t]];
    if (running >= threshold) {
      kept = t + 1;
      break;
    }
  }
  for (int64_t t = 0; t < kept; ++t) keep[order[t]] = 1;
}

// Rows i of counts (nb) and indices (nb, nb) of query head h of batch b.
void select_head(const SelectParams& p, const PooledBlocks& pooled, int64_t b, int64_t h, int32_t* counts,
                 int32_t* indices) {
  const int64_t dim = p.s.d, nb = p.nb, blocks_per_segment = p.segment_size / p.block_size;
  const int64_t bh_kv = b * p.s.hkv + h / p.s.group();
  const double* pq = pooled.q.data() + (b * p.s.hq + h) * nb * dim;
  const double* pk = pooled.k.data() + bh_kv * nb * dim;
  const int32_t* first = pooled.first.data() + bh_kv * nb;
  // the block holding token 0 (the first, should perm not be a permutation)
  const int64_t token0_block = std::find(first, first + nb, 0) - first;
  std::vector<double> scores(nb), probs(nb);
  std::vector<int32_t> order(nb);
  std::vector<uint8_t> keep(nb);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t seg_first = i / blocks_per_segment * blocks_per_segment;  // blocks of earlier segments
    const int64_t seg_end = std::min(nb, seg_first + blocks_per_segment);
    const int64_t last_row = std::min((i + 1) * p.block_size, p.s.n) - 1;
    for (int64_t j = 0; j < seg_first; ++j) scores[j] = dot_lanes(pq + i * dim, pk + j * dim, dim) * p.scale;
    std::fill(keep.begin(), keep.end(), 0);
    keep_by_mass(scores.data(), seg_first, p.threshold, order, probs, keep.data());
    for (int64_t j = seg_first; j < seg_end; ++j) keep[j] = first[j] <= last_row;
    if (p.force_first_block && token0_block < nb) keep[token0_block] = 1;
    int32_t* out = indices + i * nb;
    int32_t count = 0;
    for (int64_t j = 0; j < nb; ++j) {
      if (keep[j]) out[count++] = static_cast<int32_t>(j);
    }
    std::fill(out + count, out + nb, -1);
    counts[i] = count;
  }
}

std::tuple<at::Tensor, at::Tensor> pbs_select_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& perm,
                                                     int64_t block_size, int64_t segment_size, double threshold,
                                                     bool force_first_block, double scale) {
  const char* op = "pykernels::pbs_select_blocks";
  const Shapes s = checked_qk(q, k, block_size, segment_size, op);
  TORCH_CHECK(perm.device().is_cpu() && perm.scalar_type() == at::kInt, op, ": perm must be int32 on cpu (got ",
              perm.scalar_type(), " on ", perm.device(), ")");
  TORCH_CHECK(perm.dim() == 3 && perm.size(0) == s.batch && perm.size(1) == s.hkv && perm.size(2) == s.n, op,
              ": perm must be (B, Hkv, N) = (", s.batch, ", ", s.hkv, ", ", s.n, "), got ", perm.sizes());
  const SelectParams p{s, block_count(s.n, block_size), block_size, segment_size, threshold, scale,
                       force_first_block};
  at::Tensor counts = at::empty({s.batch, s.hq, p.nb}, q.options().dtype(at::kInt));
  at::Tensor indices = at::empty({s.batch, s.hq, p.nb, p.nb}, q.options().dtype(at::kInt));
  if (counts.numel() == 0) return {counts, indices};
  const at::Tensor order = perm.contiguous();
  const TokenRows q_rows(q), k_rows(k);
  const int64_t kv_blocks = s.batch * s.hkv * p.nb;
  PooledBlocks pooled{std::vector<double>(s.batch * s.hq * p.nb * s.d), std::vector<double>(kv_blocks * s.d),
                      std::vector<int32_t>(kv_blocks)};
  for_each_task(s.batch * p.nb, [&] { return std::vector<double>(s.d); }, [&](int64_t t, std::vector<double>& row) {
    pool_block(p, q_rows, k_rows, order.data_ptr<int32_t>(), t / p.nb, t % p.nb, row.data(), pooled, op);
  });
  int32_t* count_data = counts.data_ptr<int32_t>();
  int32_t* index_data = indices.data_ptr<int32_t>();
  for_each_task(s.batch * s.hq, [&](int64_t bh) {
    select_head(p, pooled, bh / s.hq, bh % s.hq, count_data + bh * p.nb, index_data + bh * p.nb * p.nb);
  });
  return {counts, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("pbs_permutation", &pbs_permutation);
  m.impl("pbs_select_blocks", &pbs_select_blocks);
}

}  // namespace cpu
}  // namespace pykernels
