// Launchers of the MoE routing kernels (csrc/cuda/moe.cu): top-k gating and vLLM's moe_align_block_size
// (contract: docs/PRIMITIVES.md "MoE routing", ops moe_topk_route and moe_align_block_size). Plain CUDA: raw
// device pointers, sizes, a dtype code (common/fused_element.h) and a stream; no torch headers, so moe.cu
// compiles with nvcc alone. Every launcher is asynchronous on `stream` and returns the launch status
// (cudaErrorInvalidValue for arguments outside the ranges below).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pykernels {
namespace gpu {

// ---- moe_topk_route ---------------------------------------------------------------------------------------
struct TopkRouteArgs {
  const void* logits;   // (tokens, experts), dtype `dtype`, last dim contiguous, rows `row_stride` elements apart
  int64_t row_stride;
  int dtype;            // DTypeCode: float32, bfloat16 or float16
  int64_t tokens;       // >= 0
  int experts;          // 1..1024
  int k;                // 1..min(32, experts)
  int scoring;          // MoeScoring: 0 softmax, 1 sigmoid
  const float* bias;    // float32 (experts,) or nullptr
  bool renormalize;
  int num_groups;       // 0 or 1: no groups; else divides experts
  int topk_groups;      // 1..num_groups when num_groups > 1
  float scaling;
  float* weights;       // float32 (tokens, k) contiguous
  int32_t* ids;         // int32 (tokens, k) contiguous
};

// One warp per token (route_slots(E) register slots a lane). Nothing is launched when tokens == 0.
cudaError_t launch_moe_topk_route(const TopkRouteArgs& args, cudaStream_t stream);

// ---- moe_align_block_size ---------------------------------------------------------------------------------
struct AlignArgs {
  const int32_t* ids;          // (pairs,) expert of every pair p = t * k + j, in [0, experts)
  int64_t pairs;               // T * k, < 2^31
  int experts;                 // >= 1
  int block_size;              // >= 1; align_capacity(pairs, experts, block_size) < 2^31
  const int32_t* expert_map;   // int32 (experts,) or nullptr
  int32_t* sorted_ids;         // int32 (capacity,)
  int32_t* block_expert_ids;   // int32 (capacity / block_size,)
  int32_t* total;              // int32 (1,)
  void* workspace;             // moe_align_workspace_bytes(pairs, experts) bytes of device memory, any content
  size_t workspace_bytes;
};

// Per-chunk per-expert counts and the experts' run offsets (int32).
size_t moe_align_workspace_bytes(int64_t pairs, int experts);

// Four kernels: sentinel fill of sorted_ids, per-chunk counts, a single-block scan (run offsets,
// block_expert_ids, total), and the scatter of every pair in ascending p within its expert. Deterministic.
cudaError_t launch_moe_align_block_size(const AlignArgs& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace pykernels
