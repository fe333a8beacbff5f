// Radix-select bookkeeping shared by the CUDA kernels (csrc/cuda/merging.cu) and their host tests
// (tests/test_cuda_host_logic.py): how a magnitude key is split into digits, and "which bin holds rank r"
// searches over histograms / per-chunk counts. Pure integer logic, no CUDA or torch dependency.
//
// Magnitude keys (common/merge_math.h::magnitude_key) are < 2^31, so the top-16-bit digit takes only
// 2^15 values: the first histogram has kRadixHiBins bins, the refine histogram (low 16 bits) kRadixLoBins.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace pykernels {

constexpr int kRadixLoBits = 16;
constexpr int kRadixHiBins = 1 << 15;  // key >> 16 for keys < 2^31
constexpr int kRadixLoBins = 1 << 16;  // key & 0xFFFF

PK_HD uint32_t radix_hi(uint32_t key) { return key >> kRadixLoBits; }
PK_HD uint32_t radix_lo(uint32_t key) { return key & 0xFFFFu; }
PK_HD uint32_t radix_join(uint32_t hi, uint32_t lo) { return (hi << kRadixLoBits) | lo; }

// Bin visited at scan position `pos` of an n-bin histogram: descending scans (largest keys first) start at
// the last bin, ascending scans (chunks in index order) at the first.
PK_HD int64_t scan_bin(int64_t pos, int64_t n, bool descending) { return descending ? n - 1 - pos : pos; }

// Serial search over scan positions [pos_begin, pos_end): the bin holding the `rank`-th element (1-based) of
// the scan. Returns the bin and writes the rank left inside it (1..counts[bin]) to *remaining; returns -1 if
// the positions hold fewer than `rank` elements (then *remaining = rank minus what they hold).
PK_HD int64_t find_rank(const uint64_t* counts, int64_t n, int64_t pos_begin, int64_t pos_end, uint64_t rank,
                        bool descending, uint64_t* remaining) {
  for (int64_t pos = pos_begin; pos < pos_end; ++pos) {
    const int64_t bin = scan_bin(pos, n, descending);
    const uint64_t c = counts[bin];
    if (rank <= c) {
      *remaining = rank;
      return bin;
    }
    rank -= c;
  }
  *remaining = rank;
  return -1;
}

// Parallel form of find_rank used by a thread block: thread t of `threads` owns the scan positions
// [segment_begin, segment_end) (contiguous, in scan order); after an exclusive prefix sum of the
// per-thread totals, exactly one thread has segment_holds_rank() true and finishes with find_rank().
PK_HD int64_t segment_size(int64_t n, int threads) { return (n + threads - 1) / threads; }
PK_HD int64_t segment_begin(int t, int64_t n, int threads) {
  const int64_t b = static_cast<int64_t>(t) * segment_size(n, threads);
  return b < n ? b : n;
}
PK_HD int64_t segment_end(int t, int64_t n, int threads) {
  const int64_t e = (static_cast<int64_t>(t) + 1) * segment_size(n, threads);
  return e < n ? e : n;
}
PK_HD bool segment_holds_rank(uint64_t exclusive_prefix, uint64_t segment_total, uint64_t rank) {
  return exclusive_prefix < rank && rank <= exclusive_prefix + segment_total;
}

// Phases of one model's top-k selection, kept in device memory between the passes.
enum TopkPhase : uint32_t { kTopkDone = 0, kTopkRefine = 1, kTopkTies = 2 };

struct TopkState {
  uint32_t phase;   // TopkPhase
  uint32_t bucket;  // top digit of the k-th key (after the first histogram)
  uint32_t key;     // the k-th key (after the refine histogram)
  uint32_t pad;
  uint64_t rank;    // rank still to find inside the bucket / among the ties at `key` (1-based)
};

// After the refine histogram: lo bin `lo` of bucket `bucket` holds `ties` elements with the exact key, of
// which the first `rank` (in index order) are selected. If all are selected, the cutoff is the largest index
// with that key (tracked by the refine pass) and no tie pass is needed.
PK_HD bool all_ties_kept(uint64_t rank, uint64_t ties) { return rank == ties; }

}  // namespace pykernels
