// Stable ascending order of one row of uint32 keys (csrc/cpu/selection.cpp row_rank, csrc/cpu/della.cpp).
//
// LSD radix sort of (key, index) pairs with three 11-bit digits: three counting passes over an L2-resident row,
// no comparisons. LSD radix sort is stable, so equal keys keep ascending index order, which is exactly the tie
// rule of reference.selection.row_rank. A digit that every key shares is skipped.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace pykernels {
namespace cpu {

constexpr int kRowDigitBits = 11;
constexpr int kRowDigits = 3;  // 3 x 11 bits cover a 32-bit key
constexpr uint32_t kRowDigitBins = 1u << kRowDigitBits;

// Buffers reused across the rows one thread sorts.
struct RowSortScratch {
  std::vector<uint32_t> keys[2];
  std::vector<uint32_t> index[2];

  void reserve(int64_t n) {
    for (int b = 0; b < 2; ++b) {
      if (static_cast<int64_t>(keys[b].size()) < n) {
        keys[b].resize(n);
        index[b].resize(n);
      }
    }
  }
};

inline uint32_t row_digit(uint32_t key, int d) { return (key >> (d * kRowDigitBits)) & (kRowDigitBins - 1); }

// LSD passes over the digits that differ; the last pass hands each element's final (slot, index) to
// place(slot, index) instead of writing the scratch arrays (so ranks are scattered once, not sorted then
// scattered). Rows of n < 2^32 keys.
template <typename Place>
inline void stable_key_sort(const uint32_t* keys, int64_t n, RowSortScratch& scratch, const Place& place) {
  if (n == 0) return;
  scratch.reserve(n);
  static thread_local uint32_t counts[kRowDigits][kRowDigitBins];
  std::memset(counts, 0, sizeof(counts));
  for (int64_t j = 0; j < n; ++j) {
    for (int d = 0; d < kRowDigits; ++d) ++counts[d][row_digit(keys[j], d)];
  }
  int passes[kRowDigits];
  int active = 0;
  for (int d = 0; d < kRowDigits; ++d) {
    if (counts[d][row_digit(keys[0], d)] != static_cast<uint32_t>(n)) passes[active++] = d;  // digit differs
  }
  if (active == 0) {
    for (int64_t j = 0; j < n; ++j) place(static_cast<uint32_t>(j), static_cast<uint32_t>(j));
    return;
  }
  const uint32_t* src_keys = keys;
  const uint32_t* src_index = nullptr;  // identity before the first pass
  for (int p = 0; p < active; ++p) {
    const int d = passes[p];
    uint32_t* count = counts[d];
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kRowDigitBins; ++b) {
      const uint32_t c = count[b];
      count[b] = offset;
      offset += c;
    }
    if (p + 1 == active) {
      for (int64_t j = 0; j < n; ++j) {
        place(count[row_digit(src_keys[j], d)]++, src_index ? src_index[j] : static_cast<uint32_t>(j));
      }
      return;
    }
    uint32_t* dst_keys = scratch.keys[p & 1].data();
    uint32_t* dst_index = scratch.index[p & 1].data();
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t key = src_keys[j];
      const uint32_t slot = count[row_digit(key, d)]++;
      dst_keys[slot] = key;
      dst_index[slot] = src_index ? src_index[j] : static_cast<uint32_t>(j);
    }
    src_keys = dst_keys;
    src_index = dst_index;
  }
}

// order[i] = index of the i-th smallest key (ties in ascending index order).
inline void stable_key_order(const uint32_t* keys, int64_t n, uint32_t* order, RowSortScratch& scratch) {
  stable_key_sort(keys, n, scratch, [order](uint32_t slot, uint32_t index) { order[slot] = index; });
}

// ranks[j] = 1-based position of element j in the stable ascending order of keys.
template <typename Rank>
inline void stable_key_ranks(const uint32_t* keys, int64_t n, Rank* ranks, RowSortScratch& scratch) {
  stable_key_sort(keys, n, scratch,
                  [ranks](uint32_t slot, uint32_t index) { ranks[index] = static_cast<Rank>(slot + 1); });
}

}  // namespace cpu
}  // namespace pykernels
