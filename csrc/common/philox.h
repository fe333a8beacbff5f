// Counter-based Philox4x32-10, bit-identical to triton.language.rand(seed, offset) (DESIGN.md section 2).
// Shared by the CPU and CUDA kernels so the device logic is exercised by the host tests.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace pykernels {

PK_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Uniform in [0, 1) for flat element `offset` of the stream `seed`.
PK_HD float philox_uniform(uint64_t seed, int64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = umulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = umulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Model m's independent stream: (seed + m * golden) mod 2^63.
PK_HD uint64_t model_seed(uint64_t seed, int64_t m) {
  return (seed + static_cast<uint64_t>(m) * 0x9E3779B97F4A7C15ull) & 0x7FFFFFFFFFFFFFFFull;
}

}  // namespace pykernels
