// CUDA implementations of the pykernels family-1 ops, of pbs_block_attention and of the MoE routing ops
// moe_topk_route / moe_align_block_size (schemas in csrc/ops.cpp): thin glue that checks the arguments, makes
// the inputs contiguous, sets the device guard and the current stream, and calls the launchers of
// csrc/cuda/merging.cu, csrc/cuda/attention.cu and csrc/cuda/moe.cu. Built only against a CUDA torch (setup.py
// adds it with the .cu files).
//
// Results stay on the inputs' device: delta_topk_thresholds -> int64 (N, 2), delta_l1_norms -> float64 (N, 2),
// fused_merge -> tensor shaped like tensors[0]. Nothing here synchronises with the device (the selection
// passes hand their state over in device memory), except copying CPU `thresholds` / `scales` to the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/attention.h"
#include "cuda/merging.h"
#include "cuda/moe.h"

namespace {

using pykernels::DeltaInputs;
using pykernels::SparsifyArgs;
using pykernels::kMaxModels;

int dtype_code(at::ScalarType type, const char* op, const char* what) {
  switch (type) {
    case at::kFloat:
      return pykernels::kFloat32;
    case at::kBFloat16:
      return pykernels::kBFloat16;
    case at::kHalf:
      return pykernels::kFloat16;
    default:
      TORCH_CHECK(false, "pykernels.", op, ": ", what, " must be float32, bfloat16 or float16, got ", type);
  }
  return -1;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pykernels.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Contiguous inputs (kept alive here until the op returns; the caching allocator orders their reuse on the
// current stream) and their raw description for the launchers.
struct Inputs {
  std::vector<at::Tensor> owned;
  DeltaInputs in{};
};

Inputs prepare_inputs(const std::optional<at::Tensor>& base, at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), "pykernels.", op, ": tensors must hold at least one tensor");
  TORCH_CHECK(tensors.size() <= static_cast<size_t>(kMaxModels), "pykernels.", op, ": at most ", kMaxModels,
              " tensors are supported, got ", tensors.size());
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.is_cuda(), "pykernels.", op, ": tensors[0] must be a CUDA tensor, got device ", first.device());
  Inputs r;
  r.in.n = static_cast<int>(tensors.size());
  r.in.numel = first.numel();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == first.device(), "pykernels.", op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", first.device());
    TORCH_CHECK(t.sizes() == first.sizes(), "pykernels.", op, ": tensors[", i, "] has shape ", t.sizes(),
                " but tensors[0] has shape ", first.sizes());
    r.in.dtype[i] = dtype_code(t.scalar_type(), op, "every tensor");
    r.owned.push_back(t.contiguous());
    r.in.data[i] = r.owned.back().data_ptr();
  }
  r.in.base = nullptr;
  r.in.base_dtype = pykernels::kFloat32;
  if (base.has_value() && base->defined()) {
    const at::Tensor& b = *base;
    TORCH_CHECK(b.device() == first.device(), "pykernels.", op, ": base is on ", b.device(),
                " but tensors[0] is on ", first.device());
    TORCH_CHECK(b.sizes() == first.sizes(), "pykernels.", op, ": base has shape ", b.sizes(),
                " but tensors[0] has shape ", first.sizes());
    r.in.base_dtype = dtype_code(b.scalar_type(), op, "base");
    r.owned.push_back(b.contiguous());
    r.in.base = r.owned.back().data_ptr();
  }
  return r;
}

// The sparsifier arguments; `owned_thresholds` keeps the device copy of the thresholds alive.
SparsifyArgs prepare_sparsify(int64_t sparsifier, const at::Tensor& thresholds, at::ArrayRef<double> keep_probs,
                              int64_t seed, int n, const at::Device& device, at::Tensor* owned_thresholds,
                              const char* op) {
  TORCH_CHECK(sparsifier >= 0 && sparsifier <= 3, "pykernels.", op,
              ": sparsifier must be 0 (none), 1 (magnitude), 2 (random) or 3 (band), got ", sparsifier);
  const int64_t* thresholds_dev = nullptr;
  const int columns = pykernels::threshold_columns(static_cast<int>(sparsifier));  // 2 magnitude, 4 band
  if (columns > 0) {
    TORCH_CHECK(thresholds.defined() && thresholds.dim() == 2 && thresholds.size(0) == n &&
                    thresholds.size(1) == columns,
                "pykernels.", op, ": thresholds must have shape (", n, ", ", columns, ") for sparsifier ",
                sparsifier, ", got ", thresholds.defined() ? thresholds.sizes() : at::IntArrayRef{});
    TORCH_CHECK(!at::isFloatingType(thresholds.scalar_type()) && !at::isComplexType(thresholds.scalar_type()),
                "pykernels.", op, ": thresholds must be an integer tensor, got ", thresholds.scalar_type());
    *owned_thresholds = thresholds.to(device, at::kLong).contiguous();
    thresholds_dev = owned_thresholds->data_ptr<int64_t>();
  } else if (sparsifier == pykernels::kRandom) {
    TORCH_CHECK(keep_probs.size() == static_cast<size_t>(n), "pykernels.", op, ": keep_probs must hold ", n,
                " values, got ", keep_probs.size());
  }
  return pykernels::make_sparsify_args(static_cast<int>(sparsifier), thresholds_dev, keep_probs.data(), seed, n);
}

at::Tensor delta_topk_thresholds_cuda(const std::optional<at::Tensor>& base, at::TensorList tensors,
                                      at::IntArrayRef ks) {
  constexpr const char* op = "delta_topk_thresholds";
  Inputs inputs = prepare_inputs(base, tensors, op);
  const int n = inputs.in.n;
  TORCH_CHECK(ks.size() == static_cast<size_t>(n), "pykernels.", op, ": ks must hold ", n, " values, got ",
              ks.size());
  for (int m = 0; m < n; ++m) {
    TORCH_CHECK(ks[m] >= 0 && ks[m] <= inputs.in.numel, "pykernels.", op, ": ks[", m, "] must be in [0, ",
                inputs.in.numel, "], got ", ks[m]);
  }
  const at::Tensor& first = tensors[0];
  c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  at::Tensor out = at::empty({n, 2}, first.options().dtype(at::kLong));
  const size_t workspace_bytes = pykernels::gpu::delta_topk_workspace_bytes(n, inputs.in.numel);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, first.options().dtype(at::kByte));
  check_launch(pykernels::gpu::delta_topk_thresholds(inputs.in, ks.data(), workspace.data_ptr(), workspace_bytes,
                                                      out.data_ptr<int64_t>(), stream),
               op);
  return out;
}

at::Tensor delta_l1_norms_cuda(const std::optional<at::Tensor>& base, at::TensorList tensors, int64_t sparsifier,
                               const at::Tensor& thresholds, at::ArrayRef<double> keep_probs, int64_t seed) {
  constexpr const char* op = "delta_l1_norms";
  Inputs inputs = prepare_inputs(base, tensors, op);
  const int n = inputs.in.n;
  const at::Tensor& first = tensors[0];
  c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  at::Tensor owned_thresholds;
  const SparsifyArgs sparsify =
      prepare_sparsify(sparsifier, thresholds, keep_probs, seed, n, first.device(), &owned_thresholds, op);
  at::Tensor out = at::empty({n, 2}, first.options().dtype(at::kDouble));
  const size_t workspace_bytes = pykernels::gpu::delta_l1_workspace_bytes(n, inputs.in.numel);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, first.options().dtype(at::kByte));
  check_launch(pykernels::gpu::delta_l1_norms(inputs.in, sparsify, workspace.data_ptr(), workspace_bytes,
                                               out.data_ptr<double>(), stream),
               op);
  return out;
}

at::Tensor fused_merge_cuda(const std::optional<at::Tensor>& base, at::TensorList tensors, int64_t sparsifier,
                            const at::Tensor& thresholds, at::ArrayRef<double> keep_probs, int64_t seed,
                            const at::Tensor& scales, at::ArrayRef<double> weights, int64_t sign_source,
                            int64_t consensus, int64_t divisor, bool normalize, double lambda_,
                            at::ScalarType out_dtype) {
  constexpr const char* op = "fused_merge";
  Inputs inputs = prepare_inputs(base, tensors, op);
  const int n = inputs.in.n;
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(weights.size() == static_cast<size_t>(n), "pykernels.", op, ": weights must hold ", n,
              " values, got ", weights.size());
  TORCH_CHECK(scales.defined() && scales.numel() == n, "pykernels.", op, ": scales must hold ", n, " values, got ",
              scales.defined() ? scales.numel() : 0);
  TORCH_CHECK(sign_source == 0 || sign_source == 1, "pykernels.", op,
              ": sign_source must be 0 (weighted) or 1 (unweighted), got ", sign_source);
  TORCH_CHECK(consensus >= 0 && consensus <= 2, "pykernels.", op,
              ": consensus must be 0 (none), 1 (sum) or 2 (count), got ", consensus);
  TORCH_CHECK(divisor == 0 || divisor == 1, "pykernels.", op, ": divisor must be 0 (weights) or 1 (count), got ",
              divisor);
  TORCH_CHECK(at::isFloatingType(out_dtype), "pykernels.", op, ": out_dtype must be a floating type, got ",
              out_dtype);
  c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  at::Tensor owned_thresholds;
  const SparsifyArgs sparsify =
      prepare_sparsify(sparsifier, thresholds, keep_probs, seed, n, first.device(), &owned_thresholds, op);
  const at::Tensor scales_dev = scales.to(first.device(), at::kFloat).reshape({n}).contiguous();
  pykernels::MergeSettings settings{};
  settings.scales = scales_dev.data_ptr<float>();
  for (int m = 0; m < n; ++m) settings.weights[m] = static_cast<float>(weights[m]);
  settings.sign_source = static_cast<int>(sign_source);
  settings.consensus = static_cast<int>(consensus);
  settings.divisor = static_cast<int>(divisor);
  settings.normalize = normalize;
  settings.lambda = static_cast<float>(lambda_);
  // The kernel writes fp32 / bf16 / fp16; any other floating out_dtype is a cast of the fp32 result, exactly
  // as the reference computes it.
  const bool direct = out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf;
  const at::ScalarType kernel_dtype = direct ? out_dtype : at::kFloat;
  at::Tensor out = at::empty(first.sizes(), first.options().dtype(kernel_dtype));
  check_launch(pykernels::gpu::fused_merge(inputs.in, sparsify, settings, out.data_ptr(),
                                            dtype_code(kernel_dtype, op, "out_dtype"), stream),
               op);
  return direct ? out : out.to(out_dtype);
}

// The schema has no tensor argument, so the dispatcher reaches this kernel only when asked for the CUDA key
// explicitly; the output goes to the current CUDA device.
at::Tensor philox_uniform_cuda(int64_t seed, int64_t offset, int64_t n) {
  constexpr const char* op = "philox_uniform";
  TORCH_CHECK(n >= 0, "pykernels.", op, ": n must be >= 0, got ", n);
  const c10::DeviceIndex device = c10::cuda::current_device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  check_launch(pykernels::gpu::philox_uniform(static_cast<uint64_t>(seed), offset, n, out.data_ptr<float>(), stream),
               op);
  return out;
}

// ---- pbs_block_attention (docs/PRIMITIVES.md "Attention") -----------------------------------------------------
// Shapes, dtypes and devices are checked here; the plan's contents (offsets non-decreasing from 0 to
// len(indices), indices in [0, nb), perm a permutation) are validated by the Python layer, since checking
// them here would synchronise with the device.
void check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& perm,
                            const at::Tensor& offsets, const at::Tensor& indices, int64_t block_size) {
  constexpr const char* op = "pbs_block_attention";
  TORCH_CHECK(q.is_cuda(), "pykernels.", op, ": q must be a CUDA tensor, got device ", q.device());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"k", &k}, {"v", &v}, {"perm", &perm}, {"offsets", &offsets}, {"indices", &indices}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == q.device(), "pykernels.", op, ": ", name, " is on ", t->device(), " but q is on ",
                q.device());
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pykernels.", op,
              ": q, k, v must be 4-D (B, H, N, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "pykernels.", op, ": k and v must have one shape, got ", k.sizes(), " and ",
              v.sizes());
  const int64_t batch = q.size(0), hq = q.size(1), n = q.size(2), d = q.size(3), hkv = k.size(1);
  TORCH_CHECK(k.size(0) == batch && k.size(2) == n && k.size(3) == d, "pykernels.", op,
              ": k must have shape (B, Hkv, N, D) = (", batch, ", Hkv, ", n, ", ", d, "), got ", k.sizes());
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "pykernels.", op, ": the kv heads (", hkv,
              ") must divide the query heads (", hq, ")");
  TORCH_CHECK(d == 64 || d == 80 || d == 96 || d == 128 || d == 256, "pykernels.", op,
              ": head dim must be 64, 80, 96, 128 or 256, got ", d);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "pykernels.", op,
              ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(block_size >= 16 && block_size <= (int64_t(1) << 30) && (block_size & (block_size - 1)) == 0,
              "pykernels.", op, ": block_size must be a power of two in [16, 2^30], got ", block_size);
  TORCH_CHECK(n <= INT32_MAX && batch <= INT32_MAX && hq <= INT32_MAX, "pykernels.", op,
              ": B, H and N must each be below 2^31, got ", q.sizes());
  const int64_t rows = batch * hq * ((n + block_size - 1) / block_size);
  TORCH_CHECK(perm.scalar_type() == at::kInt && perm.dim() == 3 && perm.size(0) == batch && perm.size(1) == hkv &&
                  perm.size(2) == n,
              "pykernels.", op, ": perm must be int32 (", batch, ", ", hkv, ", ", n, "), got ", perm.scalar_type(), " ",
              perm.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == rows + 1,
              "pykernels.", op, ": offsets must be int64 (", rows + 1, ",), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 1, "pykernels.", op,
              ": indices must be 1-D int32, got ", indices.scalar_type(), " ", indices.sizes());
}

// The kernel reads any batch / head / token strides but needs a contiguous last dim.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> pbs_block_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& perm,
                                                             const at::Tensor& offsets, const at::Tensor& indices,
                                                             int64_t block_size, double scale) {
  constexpr const char* op = "pbs_block_attention";
  check_attention_shapes(q, k, v, perm, offsets, indices, block_size);
  const int dtype = dtype_code(q.scalar_type(), op, "q");
  c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor qc = last_dim_contiguous(q), kc = last_dim_contiguous(k), vc = last_dim_contiguous(v);
  const at::Tensor perm_c = perm.contiguous(), offsets_c = offsets.contiguous(), indices_c = indices.contiguous();
  pykernels::gpu::BlockAttentionArgs a{};
  a.q = qc.data_ptr();
  a.k = kc.data_ptr();
  a.v = vc.data_ptr();
  for (int dim = 0; dim < 3; ++dim) {
    a.q_strides[dim] = qc.stride(dim);
    a.k_strides[dim] = kc.stride(dim);
    a.v_strides[dim] = vc.stride(dim);
  }
  a.perm = perm_c.data_ptr<int32_t>();
  a.offsets = offsets_c.data_ptr<int64_t>();
  a.indices = indices_c.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.batch = static_cast<int>(q.size(0));
  a.heads_q = static_cast<int>(q.size(1));
  a.heads_kv = static_cast<int>(k.size(1));
  a.n = q.size(2);
  a.d = static_cast<int>(q.size(3));
  a.block_size = static_cast<int>(block_size);
  a.scale = static_cast<float>(scale);
  a.dtype = dtype;
  check_launch(pykernels::gpu::launch_pbs_block_attention(a, stream), op);
  return {out, lse};
}

// ---- MoE routing (docs/PRIMITIVES.md "MoE routing") ------------------------------------------------------------
// Shapes, dtypes, devices and the integer arguments are checked here; the values (finite logits and bias, ids in
// [0, E), expert_map entries) are validated by the Python layer, since checking them here would synchronise
// with the device.
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name,
                       const char* op) {
  TORCH_CHECK(t.device() == ref.device(), "pykernels.", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

void check_route_args(const at::Tensor& logits, int64_t k, int64_t scoring, const std::optional<at::Tensor>& bias,
                      int64_t num_groups, int64_t topk_groups) {
  constexpr const char* op = "moe_topk_route";
  TORCH_CHECK(logits.is_cuda(), "pykernels.", op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "pykernels.", op, ": logits must be 2-D (tokens, experts), got ", logits.sizes());
  const int64_t experts = logits.size(1);
  TORCH_CHECK(experts >= 1 && experts <= 1024, "pykernels.", op, ": the number of experts must be in [1, 1024], got ",
              experts);
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(32, experts), "pykernels.", op, ": k must be in [1, min(32, ",
              experts, ")], got ", k);
  TORCH_CHECK(scoring == 0 || scoring == 1, "pykernels.", op, ": scoring must be 0 (softmax) or 1 (sigmoid), got ",
              scoring);
  if (bias.has_value() && bias->defined()) {
    check_same_device(*bias, logits, "bias", "logits", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == experts, "pykernels.", op, ": bias must have shape (", experts,
                ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "pykernels.", op, ": bias must be floating, got ",
                bias->scalar_type());
  }
  TORCH_CHECK(num_groups >= 0 && num_groups <= experts, "pykernels.", op, ": num_groups must be in [0, ", experts,
              "], got ", num_groups);
  if (num_groups > 1) {
    TORCH_CHECK(experts % num_groups == 0, "pykernels.", op, ": num_groups=", num_groups,
                " must divide the number of experts ", experts);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "pykernels.", op, ": topk_groups must be in [1, ",
                num_groups, "], got ", topk_groups);
  }
}

std::tuple<at::Tensor, at::Tensor> moe_topk_route_cuda(const at::Tensor& logits, int64_t k, int64_t scoring,
                                                       const std::optional<at::Tensor>& bias, bool renormalize,
                                                       int64_t num_groups, int64_t topk_groups, double scaling) {
  constexpr const char* op = "moe_topk_route";
  check_route_args(logits, k, scoring, bias, num_groups, topk_groups);
  const int dtype = dtype_code(logits.scalar_type(), op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const int64_t tokens = logits.size(0);
  at::Tensor weights = at::empty({tokens, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, k}, logits.options().dtype(at::kInt));
  if (tokens == 0) return {weights, ids};
  const at::Tensor rows = last_dim_contiguous(logits);
  at::Tensor bias_f32;
  if (bias.has_value() && bias->defined()) bias_f32 = bias->to(at::kFloat).contiguous();
  pykernels::gpu::TopkRouteArgs a{};
  a.logits = rows.data_ptr();
  a.row_stride = rows.stride(0);
  a.dtype = dtype;
  a.tokens = tokens;
  a.experts = static_cast<int>(logits.size(1));
  a.k = static_cast<int>(k);
  a.scoring = static_cast<int>(scoring);
  a.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  a.renormalize = renormalize;
  a.num_groups = static_cast<int>(num_groups);
  a.topk_groups = static_cast<int>(topk_groups);
  a.scaling = static_cast<float>(scaling);
  a.weights = weights.data_ptr<float>();
  a.ids = ids.data_ptr<int32_t>();
  check_launch(pykernels::gpu::launch_moe_topk_route(a, stream), op);
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& ids, int64_t num_experts,
                                                                         int64_t block_size,
                                                                         const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_align_block_size";
  TORCH_CHECK(ids.is_cuda(), "pykernels.", op, ": ids must be a CUDA tensor, got device ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "pykernels.", op,
              ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= INT32_MAX, "pykernels.", op,
              ": num_experts must be in [1, 2^31), got ", num_experts);
  TORCH_CHECK(block_size >= 1 && block_size <= INT32_MAX, "pykernels.", op, ": block_size must be in [1, 2^31), got ",
              block_size);
  const int64_t pairs = ids.numel();
  const int64_t capacity = (pairs + num_experts * (block_size - 1) + block_size - 1) / block_size * block_size;
  TORCH_CHECK(pairs <= INT32_MAX && capacity <= INT32_MAX, "pykernels.", op, ": T*k (", pairs,
              ") and the padded capacity (", capacity, ") must stay below 2^31 (int32 indices)");
  at::Tensor map_i32;
  if (expert_map.has_value() && expert_map->defined()) {
    check_same_device(*expert_map, ids, "expert_map", "ids", op);
    TORCH_CHECK(expert_map->dim() == 1 && expert_map->size(0) == num_experts, "pykernels.", op,
                ": expert_map must have shape (", num_experts, ",), got ", expert_map->sizes());
    map_i32 = expert_map->to(at::kInt).contiguous();
  }
  c10::cuda::CUDAGuard guard(ids.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ids.device().index()).stream();
  const at::Tensor ids_i32 = ids.to(at::kInt).contiguous();
  const at::TensorOptions int_options = ids.options().dtype(at::kInt);
  at::Tensor sorted_ids = at::empty({capacity}, int_options);
  at::Tensor block_expert_ids = at::empty({capacity / block_size}, int_options);
  at::Tensor total = at::empty({1}, int_options);
  const size_t workspace_bytes = pykernels::gpu::moe_align_workspace_bytes(pairs, static_cast<int>(num_experts));
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));
  pykernels::gpu::AlignArgs a{};
  a.ids = ids_i32.data_ptr<int32_t>();
  a.pairs = pairs;
  a.experts = static_cast<int>(num_experts);
  a.block_size = static_cast<int>(block_size);
  a.expert_map = map_i32.defined() ? map_i32.data_ptr<int32_t>() : nullptr;
  a.sorted_ids = sorted_ids.data_ptr<int32_t>();
  a.block_expert_ids = block_expert_ids.data_ptr<int32_t>();
  a.total = total.data_ptr<int32_t>();
  a.workspace = workspace.data_ptr();
  a.workspace_bytes = workspace_bytes;
  check_launch(pykernels::gpu::launch_moe_align_block_size(a, stream), op);
  return {sorted_ids, block_expert_ids, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("delta_topk_thresholds", &delta_topk_thresholds_cuda);
  m.impl("delta_l1_norms", &delta_l1_norms_cuda);
  m.impl("fused_merge", &fused_merge_cuda);
  m.impl("philox_uniform", &philox_uniform_cuda);
  m.impl("pbs_block_attention", &pbs_block_attention_cuda);
  m.impl("moe_topk_route", &moe_topk_route_cuda);
  m.impl("moe_align_block_size", &moe_align_block_size_cuda);
}
