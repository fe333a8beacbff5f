// Launcher of the PBS-Attn forward kernel (csrc/cuda/attention.cu): block-sparse causal attention over the key
// blocks listed per query block, keys read through a permutation (contract: docs/PRIMITIVES.md, "Attention",
// op pbs_block_attention). Plain CUDA: raw device pointers, sizes, element strides, a dtype code
// (common/fused_element.h) and a stream; no torch headers, so attention.cu compiles with nvcc alone.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pykernels {
namespace gpu {

struct BlockAttentionArgs {
  // q (B, Hq, N, D); k, v (B, Hkv, N, D): one dtype (DTypeCode `dtype`), last dim contiguous, the other dims
  // at the given element strides {batch, head, token}.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  const int32_t* perm;     // (B, Hkv, N) contiguous: original token of each permuted key position
  const int64_t* offsets;  // (B * Hq * nb + 1): row (b * Hq + h) * nb + i lists indices[offsets[row], offsets[row + 1])
  const int32_t* indices;  // key block numbers in [0, nb), any order, each at most once per row
  void* out;               // (B, Hq, N, D) contiguous, dtype `dtype`
  float* lse;              // (B, Hq, N) contiguous float32
  int batch;
  int heads_q;
  int heads_kv;            // divides heads_q (GQA: query head h reads kv head h / (heads_q / heads_kv))
  int64_t n;               // tokens, < 2^31 (perm is int32)
  int d;                   // head dim, 1..256 (the op takes 64, 80, 96, 128, 256)
  int block_size;          // >= 1 (the op takes powers of two >= 16); nb = ceil(n / block_size)
  float scale;
  int dtype;               // DTypeCode of q, k, v and out
};

// One CTA per (query block, batch * Hq + head); asynchronous on `stream`; returns the launch status
// (cudaErrorInvalidValue for arguments outside the ranges above). Nothing is launched when n == 0.
cudaError_t launch_pbs_block_attention(const BlockAttentionArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace pykernels
