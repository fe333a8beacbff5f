// Every pykernels C++ operator schema, defined once. Backends register implementations with
// TORCH_LIBRARY_IMPL(pykernels, CPU|CUDA, m) in csrc/cpu and csrc/cuda; fake (meta) implementations
// live in pykernels/_ops.py. The semantics of each op are those of its reference in pykernels/reference.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// pykernels._C is imported only for its side effect of registering the operators below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pykernels, m) {
  // Family 1 / 2: magnitude top-k thresholds of task vectors d_i = tensors[i] - base (base may be None: d_i =
  // tensors[i]). Returns int64 (N, 2): (key, cutoff) per model; element j is kept iff
  // mkey(d_ij) > key or (mkey(d_ij) == key and j <= cutoff). See reference.selection.delta_topk_thresholds.
  m.def("delta_topk_thresholds(Tensor? base, Tensor[] tensors, int[] ks) -> Tensor");
  // l1 norms for rescaling: float64 (N, 2) = (sum |d_i|, sum |kept d_i|). See reference.merging.delta_l1_norms.
  m.def(
      "delta_l1_norms(Tensor? base, Tensor[] tensors, int sparsifier, Tensor thresholds, float[] keep_probs, "
      "int seed) -> Tensor");
  // The fused merge pass. See reference.merging.fused_merge.
  m.def(
      "fused_merge(Tensor? base, Tensor[] tensors, int sparsifier, Tensor thresholds, float[] keep_probs, "
      "int seed, Tensor scales, float[] weights, int sign_source, int consensus, int divisor, bool normalize, "
      "float lambda_, ScalarType out_dtype) -> Tensor");
  // fused_merge with scales = l1 ratios sum|d_i| / sum|kept d_i| of delta_l1_norms (1 where either is below 1e-7),
  // computed in the same call. See reference.merging.fused_merge_l1.
  m.def(
      "fused_merge_l1(Tensor? base, Tensor[] tensors, int sparsifier, Tensor thresholds, float[] keep_probs, "
      "int seed, float[] weights, int sign_source, int consensus, int divisor, bool normalize, float lambda_, "
      "ScalarType out_dtype) -> Tensor");
  // Philox uniforms, bit-identical to triton.language.rand(seed, offset + arange(n)): float32 (n,).
  m.def("philox_uniform(int seed, int offset, int n) -> Tensor");

  // Family 2: order statistics on order-preserving uint32 keys (docs/PRIMITIVES.md, reference.selection).
  m.def("key_histogram(Tensor x, bool magnitude, int[] buckets) -> Tensor");
  m.def("key_mask(Tensor x, bool magnitude, int key, int ties) -> Tensor");
  m.def("key_find(Tensor x, bool magnitude, int key, int rank) -> Tensor");
  m.def("row_select(Tensor x, bool magnitude, int[] ks) -> Tensor");
  m.def("row_topk_mask(Tensor x, bool magnitude, int k) -> Tensor");
  m.def("row_rank(Tensor x, bool magnitude) -> Tensor");
  // Element-wise statistics across N tensors (reference.statistics).
  m.def("trimmed_mean(Tensor? base, Tensor[] tensors, int trim, ScalarType out_dtype) -> Tensor");
  m.def("sign_count(Tensor? base, Tensor[] tensors) -> Tensor");
  // DELLA: per-row rank-dependent random keep, fused with the merge (reference.della).
  m.def("della_l1_norms(Tensor? base, Tensor[] tensors, float[] densities, float[] epsilons, int seed) -> Tensor");
  m.def(
      "della_merge(Tensor? base, Tensor[] tensors, float[] densities, float[] epsilons, int seed, bool inverse, "
      "Tensor scales, float[] weights, int sign_source, int consensus, int divisor, bool normalize, float lambda_, "
      "ScalarType out_dtype) -> Tensor");

  // Family 3: permuted block-sparse attention (docs/PRIMITIVES.md "Attention", reference.attention).
  m.def("pbs_permutation(Tensor q, Tensor k, int block_size, int segment_size, float scale) -> Tensor");
  m.def(
      "pbs_select_blocks(Tensor q, Tensor k, Tensor perm, int block_size, int segment_size, float threshold, "
      "bool force_first_block, float scale) -> (Tensor, Tensor)");
  m.def(
      "pbs_block_attention(Tensor q, Tensor k, Tensor v, Tensor perm, Tensor offsets, Tensor indices, "
      "int block_size, float scale) -> (Tensor, Tensor)");

  // Family 4: MoE routing (docs/PRIMITIVES.md "MoE routing", reference.moe).
  m.def(
      "moe_topk_route(Tensor logits, int k, int scoring, Tensor? bias, bool renormalize, int num_groups, "
      "int topk_groups, float scaling) -> (Tensor, Tensor)");
  m.def(
      "moe_align_block_size(Tensor ids, int num_experts, int block_size, Tensor? expert_map) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "moe_permute(Tensor x, Tensor ids, Tensor? weights, int num_experts, float capacity_factor) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_unpermute(Tensor y, Tensor perm, Tensor weights) -> Tensor");
}
