// Launchers of the family-1 CUDA kernels (csrc/cuda/merging.cu). Plain CUDA: raw device pointers, sizes,
// dtype codes (common/fused_element.h) and a stream; no torch headers, so merging.cu compiles with nvcc alone.
// Every launcher is asynchronous on `stream` (no host synchronisation) and returns the launch status.
// Inputs are contiguous device buffers of `in.numel` elements; indices are int64 throughout.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/fused_element.h"

namespace pykernels {
namespace gpu {

// ---- delta_topk_thresholds: radix select of the k_m largest magnitude keys of d_m -------------------------
// Workspace (device, any content, 256-byte aligned) needed for n models of numel elements:
// n * (2^15 + 2 * 2^16) uint64 histograms + per-chunk tie counts + per-model state.
size_t delta_topk_workspace_bytes(int n, int64_t numel);

// ks: host array of n values in [0, numel]. out: device int64 (n, 2) row-major (key, cutoff), written by the
// kernels (k == 0 -> (2^32, -1)). Passes: top-16-bit histogram of all models, device-side bucket search,
// low-16-bit histogram inside the bucket (+ largest index per low bin), device-side search, and only for the
// models whose ties at the exact key are not all kept a per-chunk tie count + in-chunk search. A buffer listed
// more than once (same data pointer and dtype) gets one top-16-bit histogram (histogram_owner()).
cudaError_t delta_topk_thresholds(const DeltaInputs& in, const int64_t* ks, void* workspace,
                                  size_t workspace_bytes, int64_t* out, cudaStream_t stream);

// ---- delta_l1_norms -------------------------------------------------------------------------------------
// Workspace: 2 doubles per (model, fixed-size chunk of kL1Chunk elements).
size_t delta_l1_workspace_bytes(int n, int64_t numel);

// out: device float64 (n, 2) = (sum |d_m|, sum over kept |d_m|). Deterministic: per-chunk partials (fixed
// chunk size and in-chunk order), then a fixed-order reduction of the partials.
cudaError_t delta_l1_norms(const DeltaInputs& in, const SparsifyArgs& sparsify, void* workspace,
                           size_t workspace_bytes, double* out, cudaStream_t stream);

// ---- fused_merge ----------------------------------------------------------------------------------------
// settings: MergeSettings of common/fused_element.h (scales: a device float32 (n,) array; the weights travel in
// the kernel parameters).
// out: device buffer of in.numel elements of dtype out_dtype (a DTypeCode). sparsify.thresholds must be a
// device pointer to (n, threshold_columns(sparsifier)) int64 when sparsify.sparsifier is kMagnitude (n, 2) or
// kBand (n, 4). delta_l1_norms reads the same arguments.
cudaError_t fused_merge(const DeltaInputs& in, const SparsifyArgs& sparsify, const MergeSettings& settings,
                        void* out, int out_dtype, cudaStream_t stream);

// ---- philox_uniform: out[i] = philox_uniform(seed, offset + i), i < n, device float32 --------------------
cudaError_t philox_uniform(uint64_t seed, int64_t offset, int64_t n, float* out, cudaStream_t stream);

}  // namespace gpu
}  // namespace pykernels
