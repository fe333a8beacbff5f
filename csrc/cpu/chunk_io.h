// Chunked float32 views of fp32 / bf16 / fp16 tensors for the CPU merge kernels.
//
// The kernels never materialise a whole task vector: they walk the flat index range in fixed chunks, convert
// each input's chunk into a small float32 buffer (L1/L2 resident) and run simple loops over those buffers that
// the compiler vectorises. Chunk and block sizes are fixed constants (never derived from the thread count), so
// everything that depends on the partition (floating-point partial sums) is identical for any thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Hand-written AVX-512 paths (F + BW + VL), each with a scalar fallback computing exactly the same values.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PK_AVX512 1
#include <immintrin.h>
#endif

namespace pykernels {
namespace cpu {

constexpr int64_t kChunk = 4096;                      // elements processed at once
constexpr int64_t kChunksPerBlock = 16;               // chunks per block
constexpr int64_t kBlock = kChunk * kChunksPerBlock;  // unit of parallel work and of deterministic partial sums

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline void bf16_to_float(const uint16_t* __restrict src, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_float(uint32_t(src[i]) << 16);  // exact, auto-vectorised
}

inline void half_to_float(const uint16_t* __restrict src, int64_t n, float* __restrict dst) {
  int64_t i = 0;
#if defined(PK_AVX512)
  // GCC does not vectorise scalar half conversions; vcvtph2ps is exact (denormals included).
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
}

// Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, written so that it vectorises.
inline void float_to_bf16(const float* __restrict src, int64_t n, uint16_t* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_bits(src[i]);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    dst[i] = src[i] != src[i] ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
}

inline void float_to_half(const float* __restrict src, int64_t n, uint16_t* __restrict dst) {
  int64_t i = 0;
#if defined(PK_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
}

// A large fresh output is mapped by the allocator and faulted in 4 KiB pages as the merge first writes it,
// which costs about as much as the merge itself; asking for transparent huge pages (when the system leaves
// them to madvise) cuts that to the zeroing of the memory. Only a hint: any failure is ignored.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Large buffers kept mapped between op calls. On a VM a fresh allocation is page-faulted (and its pages
// zeroed) at about 1 GB/s, which costs as much as a merge pass: a merge over a model's tensors, one after
// another, reuses one retained block instead. At most one block of at most kMaxRetainedBytes is kept (memory a
// long-lived process never gets back must stay small): a request it cannot serve (too small, or in use) gets a
// new allocation, and a released block replaces a smaller retained one.
class RetainedBlock {
 public:
  static constexpr size_t kMaxRetainedBytes = size_t(256) << 20;

  // At least `bytes`, 64-byte aligned; give it back with release(ptr, capacity) (capacity set here).
  void* take(size_t bytes, size_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block_ != nullptr && bytes_ >= bytes) {
        capacity = bytes_;
        return std::exchange(block_, nullptr);
      }
      if (block_ != nullptr) std::free(std::exchange(block_, nullptr));  // too small: don't keep both
    }
    capacity = (bytes + 63) & ~size_t(63);
    void* p = std::aligned_alloc(64, capacity == 0 ? 64 : capacity);
    TORCH_CHECK(p != nullptr, "pykernels: out of memory allocating ", capacity, " bytes");
    return p;
  }

  void release(void* p, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (capacity <= kMaxRetainedBytes && (block_ == nullptr || bytes_ < capacity)) {
      std::swap(block_, p);
      bytes_ = capacity;
    }
    std::free(p);
  }

  // A new tensor over a retained block; its memory returns to the block when the tensor is freed.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
    size_t capacity = 0;
    void* p = take(bytes, capacity);
    return at::from_blob(p, sizes, [this, capacity](void* q) { release(q, capacity); },
                         at::TensorOptions().dtype(dtype));
  }

 private:
  std::mutex mutex_;
  void* block_ = nullptr;
  size_t bytes_ = 0;
};

// A contiguous fp32/bf16/fp16 tensor read as float32 chunks.
class Source {
 public:
  Source() = default;
  explicit Source(const at::Tensor& contiguous) : data_(contiguous.data_ptr()), dtype_(contiguous.scalar_type()) {}

  // Asks for elements [start, start + n) to be brought into the cache. The merge reads N + 1 streams a slice at a
  // time, bursts too short for the hardware prefetcher to ramp up on each; prefetching the next slice while
  // merging this one keeps the loads from waiting on memory.
  void prefetch(int64_t start, int64_t n) const {
    const size_t size = dtype_ == at::kFloat ? 4 : 2;
    const char* first = static_cast<const char*>(data_) + start * size;
    for (size_t offset = 0; offset < n * size; offset += 64) __builtin_prefetch(first + offset);
  }

  // float32 values of elements [start, start + n): the tensor's own memory when it is fp32, else `scratch`.
  const float* load(int64_t start, int64_t n, float* scratch) const {
    switch (dtype_) {
      case at::kFloat:
        return static_cast<const float*>(data_) + start;
      case at::kBFloat16:
        bf16_to_float(static_cast<const uint16_t*>(data_) + start, n, scratch);
        return scratch;
      default:  // at::kHalf (validated by the op)
        half_to_float(static_cast<const uint16_t*>(data_) + start, n, scratch);
        return scratch;
    }
  }

 private:
  const void* data_ = nullptr;
  at::ScalarType dtype_ = at::kFloat;
};

// Compile-time dispatch of a runtime flag, so that per-element loops carry no branch on it:
// with_bool(flag, [&](auto f) { kernel<decltype(f)::value>(...); }).
template <typename Fn>
void with_bool(bool value, Fn&& fn) {
  if (value) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Writes float32 values into an fp32/bf16/fp16 output.
class Sink {
 public:
  explicit Sink(at::Tensor& contiguous) : data_(contiguous.data_ptr()), dtype_(contiguous.scalar_type()) {}

  void store(int64_t start, int64_t n, const float* values) const {
    switch (dtype_) {
      case at::kFloat:
        std::memcpy(static_cast<float*>(data_) + start, values, n * sizeof(float));
        break;
      case at::kBFloat16:
        float_to_bf16(values, n, static_cast<uint16_t*>(data_) + start);
        break;
      default:  // at::kHalf
        float_to_half(values, n, static_cast<uint16_t*>(data_) + start);
        break;
    }
  }

 private:
  void* data_;
  at::ScalarType dtype_;
};

// The inputs of one op call: optional base and N models, all contiguous, d_m = model_m - base on the fly.
struct DeltaInputs {
  std::vector<at::Tensor> owned;  // keeps the contiguous copies alive
  Source base;
  bool has_base = false;
  std::vector<Source> models;
  int64_t numel = 0;

  int n() const { return static_cast<int>(models.size()); }

  // float32 base values of [start, start + len), or nullptr without a base.
  const float* load_base(int64_t start, int64_t len, float* scratch) const {
    return has_base ? base.load(start, len, scratch) : nullptr;
  }
};

DeltaInputs make_delta_inputs(const c10::optional<at::Tensor>& base, at::TensorList tensors, const char* op);

// all += sum |d[i]|, kept += sum of |d[i]| where keep[i], i < len, in float64 in a fixed order (merging.cpp).
void l1_chunk(const float* __restrict d, const uint8_t* __restrict keep, int64_t len, double& all, double& kept);

// Runs fn(first_block, end_block) over the fixed blocks of [0, numel) on the intra-op pool. Each call covers a
// contiguous, ascending range of blocks, runs on one thread (so it can own its scratch buffers) and spans fewer
// than 2^31 elements (so per-call uint32 counters cannot overflow: larger tensors take several rounds).
template <typename Fn>
void parallel_blocks(int64_t numel, const Fn& fn) {
  constexpr int64_t kBlocksPerRound = (int64_t(1) << 31) / kBlock;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  for (int64_t round = 0; round < blocks; round += kBlocksPerRound) {
    at::parallel_for(round, std::min(blocks, round + kBlocksPerRound), 1, fn);
  }
}

// Calls fn(chunk_start, chunk_len) for every chunk of block `block`.
template <typename Fn>
void for_chunks_of_block(int64_t numel, int64_t block, const Fn& fn) {
  const int64_t end = std::min(numel, (block + 1) * kBlock);
  for (int64_t start = block * kBlock; start < end; start += kChunk) fn(start, std::min(kChunk, end - start));
}

// Scratch memory of the calling thread, kept between op calls: a fresh multi-megabyte allocation is mapped and
// page-faulted anew on every call, which costs more than the work on small tensors. Buffers in use at the same
// time on one thread need distinct slots (the thread calling parallel_for is also one of its workers). Requests
// above kMaxRetainedScratch get a one-off allocation instead, so a thread keeps at most 3 x 16 MiB. Contents are
// undefined; 64-byte aligned.
enum ScratchSlot : int { kChunkSlot = 0, kCountSlot = 1, kTotalSlot = 2, kScratchSlots = 3 };
constexpr size_t kMaxRetainedScratch = size_t(16) << 20;

class ThreadScratch {
 public:
  ThreadScratch(ScratchSlot slot, size_t bytes) {
    struct Retained {
      std::unique_ptr<char[]> memory;
      size_t bytes = 0;
    };
    thread_local Retained retained[kScratchSlots];
    char* raw;
    if (bytes > kMaxRetainedScratch) {
      owned_.reset(new char[bytes + 64]);
      raw = owned_.get();
    } else {
      Retained& r = retained[slot];
      if (r.bytes < bytes) {
        r.memory.reset(new char[bytes + 64]);
        r.bytes = bytes;
      }
      raw = r.memory.get();
    }
    data_ = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t(63));
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;

  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }

  // The buffer as n zeroed values of T.
  template <typename T>
  T* zeroed(size_t n) const {
    std::memset(data_, 0, n * sizeof(T));
    return as<T>();
  }

 private:
  std::unique_ptr<char[]> owned_;
  char* data_;
};

// Per-thread float buffers: `count` arrays of kChunk floats (64-byte aligned). Consecutive buffers are skewed by
// 320 bytes: at a multiple of 4 KiB apart, a load from one buffer falsely waits on an earlier store to another
// at the same index (4K aliasing), which slowed the loops that read one buffer and write another by half.
class ChunkBuffers {
 public:
  static constexpr int64_t kStride = kChunk + 80;

  explicit ChunkBuffers(int count) : scratch_(kChunkSlot, static_cast<size_t>(count) * kStride * sizeof(float)) {}
  float* operator[](int i) const { return scratch_.as<float>() + static_cast<int64_t>(i) * kStride; }

 private:
  ThreadScratch scratch_;
};

}  // namespace cpu
}  // namespace pykernels
