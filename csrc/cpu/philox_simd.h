// Philox draws for a run of consecutive offsets, 32 at a time with AVX-512 (GCC's auto-vectorisation of
// common/philox.h uses vpmullq and is several times slower). Integer-exact, so bit-identical to
// pykernels::philox_uniform; the scalar loop handles the tail and non-AVX-512 builds.
#pragma once
#include <cstdint>

#include "common/philox.h"
#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {

constexpr float kUniformScale = 4.6566127342e-10f;  // philox_uniform's 2^-31

// philox_uniform(seed, j) < p  <=>  x_j < philox_keep_limit(p), where x_j in [0, 2^31) is the integer the
// uniform is made from (float(x) * 2^-31 is monotone in x): one integer compare per element instead of a
// conversion, a multiply and a float compare. NaN p keeps nothing, as u < NaN does.
inline uint32_t philox_keep_limit(float p) {
  uint32_t lo = 0, hi = 0x80000000u;  // the smallest x with float(x) * 2^-31 >= p lies in [lo, hi]
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (static_cast<float>(static_cast<int32_t>(mid)) * kUniformScale < p) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

#if defined(PK_AVX512)
// The round keys of `seed`: scalar, and broadcast into the low half of every 64-bit lane.
struct PhiloxKeys {
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      k0[round] = a;
      k1[round] = b;
      v0[round] = _mm512_set1_epi64(a);
      v1[round] = _mm512_set1_epi64(b);
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
  }
  uint32_t k0[10], k1[10];
  __m512i v0[10], v1[10];
};

// Word 0 of Philox4x32-10 for the 32 counters first .. first + 31, which must share their high word
// (first >> 32). Each 32-bit state word lives in the low half of a 64-bit lane, so one vpmuludq gives a product's
// high (after a shift) and low words; 4 vectors of 8 lanes are independent chains for the out-of-order core.
// Three rounds are partly scalar: round 0 has c2 = c3 = 0, which makes round 1's c0 (= c1 ^ k0) and hence its
// 0xD2511F53 * c0 the same in every lane, and the last round needs only word 0: 17 vector multiplies per 8
// counters instead of 20.
inline void philox_word0_x32(const PhiloxKeys& key, int64_t first, __m512i out[4]) {
  constexpr uint32_t kMulA = 0xCD9E8D57u, kMulB = 0xD2511F53u;
  const __m512i ma = _mm512_set1_epi64(kMulA), mb = _mm512_set1_epi64(kMulB);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const auto hi = [](__m512i product) { return _mm512_srli_epi64(product, 32); };
  __m512i c0[4], c1[4], c2[4], c3[4];
  // round 0: c0 <- c1 ^ k0 (uniform), c2 <- hi(B * counter) ^ k1, c1 <- 0, c3 <- lo(B * counter)
  const uint32_t c0_uniform = static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32) ^ key.k0[0];
  for (int w = 0; w < 4; ++w) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(first + 8 * w), lane);
    const __m512i p = _mm512_mul_epu32(counter, mb);
    c2[w] = _mm512_xor_si512(hi(p), key.v1[0]);
    c3[w] = p;
  }
  // round 1: c0 <- hi(A * c2) ^ k0 (c1 = 0), c2 <- c3 ^ hi(B * c0) ^ k1 and c3 <- lo(B * c0) with c0 uniform
  const uint64_t p_uniform = static_cast<uint64_t>(kMulB) * c0_uniform;
  const __m512i c2_term = _mm512_set1_epi64(static_cast<uint32_t>(p_uniform >> 32) ^ key.k1[1]);
  for (int w = 0; w < 4; ++w) {
    const __m512i p = _mm512_mul_epu32(c2[w], ma);
    c0[w] = _mm512_xor_si512(hi(p), key.v0[1]);
    c2[w] = _mm512_xor_si512(c3[w], c2_term);
    c1[w] = p;
  }
  // round 2: the general round with c3 uniform
  const __m512i k1_term = _mm512_set1_epi64(static_cast<uint32_t>(p_uniform) ^ key.k1[2]);
  for (int w = 0; w < 4; ++w) {
    const __m512i pa = _mm512_mul_epu32(c2[w], ma), pb = _mm512_mul_epu32(c0[w], mb);
    c0[w] = _mm512_ternarylogic_epi64(hi(pa), c1[w], key.v0[2], 0x96);  // a ^ b ^ c
    c2[w] = _mm512_xor_si512(hi(pb), k1_term);
    c1[w] = pa;
    c3[w] = pb;
  }
  for (int round = 3; round < 9; ++round) {
    for (int w = 0; w < 4; ++w) {
      const __m512i pa = _mm512_mul_epu32(c2[w], ma), pb = _mm512_mul_epu32(c0[w], mb);
      c0[w] = _mm512_ternarylogic_epi64(hi(pa), c1[w], key.v0[round], 0x96);
      c2[w] = _mm512_ternarylogic_epi64(hi(pb), c3[w], key.v1[round], 0x96);
      c1[w] = pa;
      c3[w] = pb;
    }
  }
  for (int w = 0; w < 4; ++w) {
    out[w] = _mm512_ternarylogic_epi64(hi(_mm512_mul_epu32(c2[w], ma)), c1[w], key.v0[9], 0x96);
  }
}

// The integers x in [0, 2^31) of 32 draws (x = ~word0 where word0 read as int32 is negative), 16 per vector.
inline void philox_x32(const PhiloxKeys& key, int64_t first, __m512i x[2]) {
  __m512i word0[4];
  philox_word0_x32(key, first, word0);
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int h = 0; h < 2; ++h) {
    const __m512i c0 = _mm512_permutex2var_epi32(word0[2 * h], low_halves, word0[2 * h + 1]);
    x[h] = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
  }
}

// Whether [first, first + 32) shares one high counter word (always, unless it straddles a multiple of 2^32).
inline bool same_high_word(int64_t first) {
  return (static_cast<uint64_t>(first) >> 32) == (static_cast<uint64_t>(first + 31) >> 32);
}
#endif

// out[i] = philox_uniform(seed, first + i), i < n.
inline void philox_uniform_fill(uint64_t seed, int64_t first, int64_t n, float* out) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const PhiloxKeys key(seed);
  for (; i + 32 <= n && same_high_word(first + i); i += 32) {
    __m512i x[2];
    philox_x32(key, first + i, x);
    for (int h = 0; h < 2; ++h) {
      _mm512_storeu_ps(out + i + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(x[h]), _mm512_set1_ps(kUniformScale)));
    }
  }
#endif
  for (; i < n; ++i) out[i] = philox_uniform(seed, first + i);
}

// Bit i % 16 of words[i / 16] = philox_uniform(seed, first + i) < p, i < n, with limit = philox_keep_limit(p).
// `first` is a multiple of 16.
inline void philox_keep_words(uint64_t seed, uint32_t limit, float p, int64_t first, int64_t n, uint16_t* words) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const PhiloxKeys key(seed);
  const __m512i bound = _mm512_set1_epi32(static_cast<int32_t>(limit));
  for (; i + 32 <= n && same_high_word(first + i); i += 32) {
    __m512i x[2];
    philox_x32(key, first + i, x);
    words[i / 16] = _mm512_cmplt_epu32_mask(x[0], bound);
    words[i / 16 + 1] = _mm512_cmplt_epu32_mask(x[1], bound);
  }
#endif
  for (; i < n; i += 16) {
    uint16_t word = 0;
    for (int64_t b = 0; b < 16 && i + b < n; ++b) {
      word |= static_cast<uint16_t>((philox_uniform(seed, first + i + b) < p) << b);
    }
    words[i / 16] = word;
  }
}

}  // namespace cpu
}  // namespace pykernels
