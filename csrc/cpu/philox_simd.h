// Philox uniforms for a run of consecutive offsets, 16 at a time with AVX-512 (GCC's auto-vectorisation of
// common/philox.h uses vpmullq and is several times slower). Integer-exact, so bit-identical to
// pykernels::philox_uniform; the scalar loop handles the tail and non-AVX-512 builds.
#pragma once
#include <cstdint>

#include "common/philox.h"
#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {

#if defined(PK_AVX512)
// One Philox4x32-10 evaluation for 8 counters held in 64-bit lanes: each 32-bit word of the state lives in the
// low half of a 64-bit lane (the high half is don't-care: vpmuludq reads only low halves), so a product's high
// and low words come from one vpmuludq and one shift, with no lane shuffles.
inline __m512i philox_word0_x8(__m512i counter, const __m512i* round_keys) {
  const __m512i ma = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i mb = _mm512_set1_epi64(0xD2511F53u);
  __m512i c0 = counter, c1 = _mm512_srli_epi64(counter, 32);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  for (int round = 0; round < 10; ++round) {
    const __m512i pa = _mm512_mul_epu32(c2, ma);  // 0xCD9E8D57 * c2
    const __m512i pb = _mm512_mul_epu32(c0, mb);  // 0xD2511F53 * c0
    // 0x96: a ^ b ^ c. round_keys[2r] holds k0 in every lane's low half, [2r+1] k1.
    c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c1, round_keys[2 * round], 0x96);
    c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c3, round_keys[2 * round + 1], 0x96);
    c1 = pa;
    c3 = pb;
  }
  return c0;
}

// The 20 round keys of `seed`, broadcast.
struct PhiloxKeys {
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      keys[2 * round] = _mm512_set1_epi64(k0);
      keys[2 * round + 1] = _mm512_set1_epi64(k1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
  }
  __m512i keys[20];
};

// Uniforms of offsets first .. first + 15.
inline __m512 philox_uniform16(const PhiloxKeys& key, int64_t first) {
  const __m512i base = _mm512_set1_epi64(first);
  const __m512i lo = philox_word0_x8(_mm512_add_epi64(base, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)), key.keys);
  const __m512i hi =
      philox_word0_x8(_mm512_add_epi64(base, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15)), key.keys);
  // The low halves of the 16 64-bit lanes, in order.
  const __m512i pick = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i c0 = _mm512_permutex2var_epi32(lo, pick, hi);
  const __m512i x = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}
#endif

// out[i] = philox_uniform(seed, first + i), i < n.
inline void philox_uniform_fill(uint64_t seed, int64_t first, int64_t n, float* out) {
  int64_t i = 0;
#if defined(PK_AVX512)
  const PhiloxKeys key(seed);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, philox_uniform16(key, first + i));
#endif
  for (; i < n; ++i) out[i] = philox_uniform(seed, first + i);
}

}  // namespace cpu
}  // namespace pykernels
