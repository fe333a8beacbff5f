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

// order[i] = index of the i-th smallest key (ties in ascending index order), for rows of n < 2^32 keys.
inline void stable_key_order(const uint32_t* keys, int64_t n, uint32_t* order, RowSortScratch& scratch) {
  if (n == 0) return;
  scratch.reserve(n);
  static thread_local uint32_t counts[kRowDigits][kRowDigitBins];
  std::memset(counts, 0, sizeof(counts));
  for (int64_t j = 0; j < n; ++j) {
    for (int d = 0; d < kRowDigits; ++d) ++counts[d][row_digit(keys[j], d)];
  }
  const uint32_t* src_keys = keys;
  const uint32_t* src_index = nullptr;  // identity before the first pass
  int buffer = 0;
  for (int d = 0; d < kRowDigits; ++d) {
    uint32_t* count = counts[d];
    if (count[row_digit(keys[0], d)] == static_cast<uint32_t>(n)) continue;  // one shared digit: order unchanged
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kRowDigitBins; ++b) {
      const uint32_t c = count[b];
      count[b] = offset;
      offset += c;
    }
    uint32_t* dst_keys = scratch.keys[buffer].data();
    uint32_t* dst_index = scratch.index[buffer].data();
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t key = src_keys[j];
      const uint32_t slot = count[row_digit(key, d)]++;
      dst_keys[slot] = key;
      dst_index[slot] = src_index ? src_index[j] : static_cast<uint32_t>(j);
    }
    src_keys = dst_keys;
    src_index = dst_index;
    buffer ^= 1;
  }
  if (src_index == nullptr) {
    for (int64_t j = 0; j < n; ++j) order[j] = static_cast<uint32_t>(j);
  } else {
    std::memcpy(order, src_index, n * sizeof(uint32_t));
  }
}

// ranks[j] = 1-based position of element j in the stable ascending order of keys.
template <typename Rank>
inline void stable_key_ranks(const uint32_t* keys, int64_t n, uint32_t* order, Rank* ranks,
                             RowSortScratch& scratch) {
  stable_key_order(keys, n, order, scratch);
  for (int64_t i = 0; i < n; ++i) ranks[order[i]] = static_cast<Rank>(i + 1);
}

}  // namespace cpu
}  // namespace pykernels
