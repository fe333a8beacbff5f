"""Host tests of the CUDA MoE routing kernels' device logic (no GPU needed).

csrc/cuda/moe.cu keeps its selection rule, scores and align bookkeeping in the PK_HD helpers of
csrc/common/moe_topk.h. A harness compiled here with g++ (ctypes, no torch headers) runs those helpers in the
kernels' order and the results are compared with pykernels.reference.moe:
  * moe_topk_route, one warp per token emulated lane by lane: the register slots of each lane, the row max and
    sum of the softmax as xor butterflies, the keys, grouped routing (row keys in "shared memory", group scores,
    group ranks, masking), then k rounds of lane offers + argmax butterfly + the owner taking its slot, and the
    renormalization in winner order. The butterfly's result must be the same on all 32 lanes, and the ids must
    equal those of the serial SortedTopK<32> of the same keys and those of the reference (exactly); weights
    within float32 round-off.
  * moe_align_block_size: chunk geometry, per-chunk counts, the column scans, run offsets, block_expert_ids by
    binary search, and the scatter in warp steps of 32 pairs ranked by an emulated __match_any_sync, compared
    bit for bit with the reference (also with small forced chunks, so that many chunks meet in one expert).
Not exercised here: shuffles, shared memory, atomics, launch configuration (tools/check_cuda.sh compiles
those). With a GPU and a CUDA build, the last tests run the real ops on the same cases.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from pykernels import _backend
from pykernels.reference import moe as ref

from conftest import FP32_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SOFTMAX, SIGMOID = ref.SOFTMAX, ref.SIGMOID

HARNESS = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/fused_element.h"
#include "common/moe_topk.h"

using namespace pykernels;

namespace {

constexpr int kLanes = 32;

// The kernel's xor butterfly, lane by lane: every lane combines its value with its partner's at each step.
// `agree` is cleared when the lanes do not all end with the same value.
template <typename T, typename Combine, typename Same>
T butterfly(const T* values, Combine combine, Same same, bool* agree) {
  std::vector<T> lanes(values, values + kLanes), next(kLanes);
  for (int offset = 16; offset > 0; offset >>= 1) {
    for (int l = 0; l < kLanes; ++l) next[l] = combine(lanes[l], lanes[l ^ offset]);
    lanes = next;
  }
  for (int l = 1; l < kLanes; ++l) *agree = *agree && same(lanes[l], lanes[0]);
  return lanes[0];
}

bool same_bits(float a, float b) { return bits_from_float(a) == bits_from_float(b); }
float warp_max(const float* v, bool* agree) {
  return butterfly(v, [](float a, float b) { return fmaxf(a, b); }, same_bits, agree);
}
float warp_sum(const float* v, bool* agree) {
  return butterfly(v, [](float a, float b) { return a + b; }, same_bits, agree);
}
RouteCandidate warp_first(const RouteCandidate* v, bool* agree) {
  auto same = [](const RouteCandidate& a, const RouteCandidate& b) {
    return same_bits(a.key, b.key) && a.id == b.id && same_bits(a.score, b.score);
  };
  return butterfly(v, first_of, same, agree);
}

struct RouteArgs {
  const void* logits;
  int64_t row_stride;
  int dtype, experts, k, scoring;
  const float* bias;
  bool renormalize;
  int num_groups, topk_groups;
  float scaling;
};

// keep_top_groups of moe.cu: row keys to the warp's shared memory, lane-owned group scores and ranks, masking.
template <int kSlots>
void keep_top_groups(const RouteArgs& a, const uint32_t* unused, float (*key)[kSlots]) {
  const int group_size = a.experts / a.num_groups;
  std::vector<float> row_keys(a.experts), scores(a.num_groups);
  std::vector<uint8_t> kept(a.num_groups);
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int slot = 0; slot < kSlots; ++slot) {
      if (slot_used(unused[lane], slot)) row_keys[lane_expert(lane, slot)] = key[lane][slot];
    }
  }
  for (int g = 0; g < a.num_groups; ++g) {
    scores[g] = group_score(row_keys.data() + g * group_size, group_size, a.bias != nullptr);
  }
  for (int g = 0; g < a.num_groups; ++g) kept[g] = group_kept(scores.data(), a.num_groups, g, a.topk_groups);
  for (int lane = 0; lane < kLanes; ++lane) lane_mask_groups(kept.data(), group_size, lane, unused[lane], key[lane]);
}

// The serial top-k of the keys the warp rounds saw (after group masking), in the selection order.
template <int kSlots>
void serial_topk(const RouteArgs& a, const uint32_t* unused, const float (*key)[kSlots], int32_t* ids) {
  SortedTopK<kMoeMaxK> top;
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int slot = 0; slot < kSlots; ++slot) {
      if (slot_used(unused[lane], slot)) top.insert(RouteCandidate{key[lane][slot], lane_expert(lane, slot), 0.f});
    }
  }
  for (int j = 0; j < a.k; ++j) ids[j] = top.item[j].id;
}

// moe_topk_route_kernel for one token (one warp), lane by lane.
template <int kSlots>
void route_token(const RouteArgs& a, int64_t token, float* weights, int32_t* ids, int32_t* serial_ids, bool* agree) {
  float x[kLanes][kSlots], score[kLanes][kSlots], key[kLanes][kSlots], lane_value[kLanes];
  uint32_t unused[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    unused[lane] = unused_slots(lane, a.experts, kSlots);
    for (int slot = 0; slot < kSlots; ++slot) {
      const int64_t at = token * a.row_stride + lane_expert(lane, slot);
      x[lane][slot] = slot_used(unused[lane], slot) ? load_as_float(a.logits, a.dtype, at) : -INFINITY;
    }
  }
  if (a.scoring == kMoeSoftmax) {
    for (int lane = 0; lane < kLanes; ++lane) lane_value[lane] = lane_logit_max(x[lane], unused[lane]);
    const float row_max = warp_max(lane_value, agree);
    for (int lane = 0; lane < kLanes; ++lane) {
      lane_value[lane] = lane_softmax_numerators(x[lane], row_max, unused[lane], score[lane]);
    }
    const float row_sum = warp_sum(lane_value, agree);
    for (int lane = 0; lane < kLanes; ++lane) lane_softmax_scores(row_sum, score[lane]);
  } else {
    for (int lane = 0; lane < kLanes; ++lane) lane_sigmoid_scores(x[lane], unused[lane], score[lane]);
  }
  for (int lane = 0; lane < kLanes; ++lane) lane_keys(x[lane], score[lane], a.bias, lane, unused[lane], key[lane]);
  if (a.num_groups > 1) keep_top_groups<kSlots>(a, unused, key);
  serial_topk<kSlots>(a, unused, key, serial_ids);

  uint32_t taken[kLanes];
  RouteCandidate mine[kLanes], offer[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    taken[lane] = unused[lane];
    mine[lane] = no_candidate();
  }
  for (int round = 0; round < a.k; ++round) {
    for (int lane = 0; lane < kLanes; ++lane) offer[lane] = lane_best(key[lane], score[lane], taken[lane], lane);
    const RouteCandidate winner = warp_first(offer, agree);
    for (int lane = 0; lane < kLanes; ++lane) taken[lane] = take_winner(taken[lane], winner, lane);
    mine[round] = winner;
  }
  float total = 0.f;
  if (a.renormalize) {
    for (int j = 0; j < a.k; ++j) total += mine[j].score;
  }
  for (int lane = 0; lane < a.k; ++lane) {
    weights[lane] = route_weight(mine[lane].score, total, a.renormalize, a.scaling);
    ids[lane] = mine[lane].id;
  }
}

template <int kSlots>
void route_rows(const RouteArgs& a, int64_t tokens, float* weights, int32_t* ids, int32_t* serial_ids,
                bool* agree) {
  for (int64_t t = 0; t < tokens; ++t) {
    route_token<kSlots>(a, t, weights + t * a.k, ids + t * a.k, serial_ids + t * a.k, agree);
  }
}

// __match_any_sync: the lanes holding the same value as `lane`.
uint32_t match_any(const int32_t* values, int lane) {
  uint32_t mask = 0;
  for (int l = 0; l < kLanes; ++l) mask |= values[l] == values[lane] ? 1u << l : 0u;
  return mask;
}

// scatter_pairs_kernel for one chunk (one warp), step by step.
void scatter_chunk(const int32_t* ids, int64_t begin, int64_t end, const int32_t* expert_map,
                   const int32_t* run_offsets, int32_t* position, int32_t* sorted_ids) {
  for (int64_t step = begin; step < end; step += kLanes) {
    int32_t e[kLanes];
    uint32_t same[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) e[lane] = step + lane < end ? ids[step + lane] : -1;
    for (int lane = 0; lane < kLanes; ++lane) same[lane] = match_any(e, lane);
    for (int lane = 0; lane < kLanes; ++lane) {
      if (e[lane] >= 0 && local_expert(e[lane], expert_map) >= 0) {
        sorted_ids[run_offsets[e[lane]] + position[e[lane]] + rank_in_step(same[lane], lane)] =
            static_cast<int32_t>(step + lane);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      if (e[lane] >= 0 && lane == step_leader(same[lane])) position[e[lane]] += popcount32(same[lane]);
    }
  }
}

}  // namespace

extern "C" {

// The whole grid of moe_topk_route_kernel, token by token. Returns 1 when every butterfly ended with the same
// value on all lanes.
int pk_topk_route(const void* logits, int64_t row_stride, int dtype, int64_t tokens, int experts, int k,
                  int scoring, const float* bias, int renormalize, int num_groups, int topk_groups, float scaling,
                  float* weights, int32_t* ids, int32_t* serial_ids) {
  const RouteArgs a{logits, row_stride, dtype, experts, k, scoring, bias, renormalize != 0, num_groups,
                    topk_groups, scaling};
  bool agree = true;
  switch (route_slots(experts)) {
    case 1: route_rows<1>(a, tokens, weights, ids, serial_ids, &agree); break;
    case 2: route_rows<2>(a, tokens, weights, ids, serial_ids, &agree); break;
    case 4: route_rows<4>(a, tokens, weights, ids, serial_ids, &agree); break;
    case 8: route_rows<8>(a, tokens, weights, ids, serial_ids, &agree); break;
    case 16: route_rows<16>(a, tokens, weights, ids, serial_ids, &agree); break;
    default: route_rows<kMoeMaxSlots>(a, tokens, weights, ids, serial_ids, &agree); break;
  }
  return agree ? 1 : 0;
}

// The four align kernels in launch order. chunk_pairs > 0 forces that chunk size (else align_chunks()).
// Returns the number of chunks.
int64_t pk_align(const int32_t* ids, int64_t pairs, int experts, int block_size, const int32_t* expert_map,
                 int64_t chunk_pairs, int32_t* sorted_ids, int32_t* block_expert_ids, int32_t* total) {
  AlignChunks chunks = align_chunks(pairs, experts);
  if (chunk_pairs > 0) chunks = AlignChunks{ceil_div64(pairs, chunk_pairs), chunk_pairs};
  const int64_t capacity = align_capacity(pairs, experts, block_size);
  // fill_sentinel_kernel
  std::fill(sorted_ids, sorted_ids + capacity, static_cast<int32_t>(pairs));
  // count_chunks_kernel
  std::vector<int32_t> chunk_counts(chunks.count * experts, 0), run_offsets(experts);
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int64_t p = c * chunks.pairs; p < std::min(pairs, (c + 1) * chunks.pairs); ++p) {
      ++chunk_counts[c * experts + ids[p]];
    }
  }
  // scan_runs_kernel (its block scan is an exact integer prefix sum)
  for (int e = 0; e < experts; ++e) run_offsets[e] = scan_chunk_column(chunk_counts.data(), chunks.count, experts, e);
  int32_t base = 0;
  for (int e = 0; e < experts; ++e) {
    const int32_t run = static_cast<int32_t>(expert_run(run_offsets[e], local_expert(e, expert_map), block_size));
    run_offsets[e] = base;
    base += run;
  }
  for (int64_t b = 0; b < capacity / block_size; ++b) {
    block_expert_ids[b] = block_expert_id(run_offsets.data(), experts, base, b, block_size, expert_map);
  }
  *total = base;
  // scatter_pairs_kernel
  for (int64_t c = 0; c < chunks.count; ++c) {
    scatter_chunk(ids, c * chunks.pairs, std::min(pairs, (c + 1) * chunks.pairs), expert_map, run_offsets.data(),
                  chunk_counts.data() + c * experts, sorted_ids);
  }
  return chunks.count;
}

void pk_align_chunks(int64_t pairs, int64_t experts, int64_t* out) {
  const AlignChunks c = align_chunks(pairs, experts);
  out[0] = c.count;
  out[1] = c.pairs;
}

int pk_route_slots(int experts) { return route_slots(experts); }

float pk_group_score(const float* keys, int size, int has_bias) { return group_score(keys, size, has_bias != 0); }

int pk_group_kept(const float* scores, int groups, int g, int kept) { return group_kept(scores, groups, g, kept); }

}  // extern "C"
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the host harness")
    tmp = tmp_path_factory.mktemp("cuda_moe_host")
    src, so = tmp / "harness.cpp", tmp / "harness.so"
    src.write_text(HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-shared", "-fPIC",
           "-I", CSRC, str(src), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"harness build failed:\n{' '.join(cmd)}\n{done.stderr}"
    h = ctypes.CDLL(str(so))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    h.pk_topk_route.argtypes = [p, i64, i32, i64, i32, i32, i32, p, i32, i32, i32, f32, p, p, p]
    h.pk_topk_route.restype = i32
    h.pk_align.argtypes = [p, i64, i32, i32, p, i64, p, p, p]
    h.pk_align.restype = i64
    h.pk_align_chunks.argtypes = [i64, i64, p]
    h.pk_align_chunks.restype = None
    h.pk_route_slots.argtypes = [i32]
    h.pk_route_slots.restype = i32
    h.pk_group_score.argtypes = [p, i32, i32]
    h.pk_group_score.restype = f32
    h.pk_group_kept.argtypes = [p, i32, i32, i32]
    h.pk_group_kept.restype = i32
    return h


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


# ---- moe_topk_route ----------------------------------------------------------------------------------------
def host_route(lib, logits, k, scoring, bias, renormalize, num_groups, topk_groups, scaling):
    """(weights, ids, serial ids, lanes agreed) of the harness; logits may have strided rows."""
    assert logits.stride(-1) == 1
    tokens, experts = logits.shape
    weights = torch.full((tokens, k), float("nan"))
    ids = torch.full((tokens, k), -7, dtype=torch.int32)
    serial = torch.full((tokens, k), -7, dtype=torch.int32)
    bias_f32 = None if bias is None else bias.float().contiguous()
    agreed = lib.pk_topk_route(_ptr(logits), logits.stride(0), DTYPE_CODES[logits.dtype], tokens, experts, k,
                               scoring, _ptr(bias_f32), int(renormalize), num_groups, topk_groups, scaling,
                               _ptr(weights), _ptr(ids), _ptr(serial))
    return weights, ids, serial, bool(agreed)


def make_logits(tokens, experts, dtype, seed, ties=False, wide=False):
    """Random logits; `ties`: values from a small grid (many exact ties, also after sigmoid + a grid bias);
    `wide`: rows of a wider buffer (row stride > E)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, (tokens, experts + 5 * wide), generator=g).float() * 0.5
    else:
        x = 2 * torch.randn(tokens, experts + 5 * wide, generator=g)
    return x.to(dtype)[:, :experts]


def make_bias(experts, seed, ties=False):
    """A selection bias, mostly negative (aux-loss-free balancing pushes overloaded experts down)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 1, (experts,), generator=g).float() * 0.25
    return torch.rand(experts, generator=g) * 0.3 - 0.25


ROUTE_CASES = [
    # id, tokens, E, k, scoring, bias?, renormalize, groups, topk_groups, scaling, dtype, ties, wide
    ("e1", 17, 1, 1, SOFTMAX, False, True, 0, 0, 1.0, torch.float32, False, False),
    ("e1-sigmoid-bias", 9, 1, 1, SIGMOID, True, False, 0, 0, 2.0, torch.float32, False, False),
    ("e3-sigmoid", 40, 3, 2, SIGMOID, False, True, 0, 0, 1.0, torch.bfloat16, False, True),
    ("e3-k3-bias", 40, 3, 3, SOFTMAX, True, False, 0, 0, 0.5, torch.float32, True, False),
    ("e60-ties", 200, 60, 6, SOFTMAX, False, True, 0, 0, 1.0, torch.float32, True, True),
    ("e60-bf16", 200, 60, 4, SOFTMAX, False, False, 0, 0, 1.0, torch.bfloat16, False, False),
    ("e60-groups", 150, 60, 4, SOFTMAX, False, True, 5, 2, 1.0, torch.float16, False, False),
    ("e64-k32-ties", 100, 64, 32, SIGMOID, True, True, 0, 0, 1.0, torch.float32, True, False),
    ("deepseek-v3", 128, 256, 8, SIGMOID, True, True, 8, 4, 2.5, torch.bfloat16, False, False),
    ("deepseek-v3-ties", 128, 256, 8, SIGMOID, True, True, 8, 4, 2.5, torch.float32, True, False),
    ("e256-groups-nobias", 64, 256, 8, SOFTMAX, False, True, 8, 3, 1.0, torch.float32, False, True),
    ("e128-group-size-1", 64, 128, 8, SIGMOID, True, True, 128, 20, 1.0, torch.float32, True, False),
    ("e1000-k32", 48, 1000, 32, SOFTMAX, False, True, 0, 0, 1.0, torch.float16, False, False),
    ("e1000-groups-bias", 48, 1000, 8, SIGMOID, True, False, 8, 3, 1.0, torch.float32, False, True),
    ("e1024-k32-ties", 32, 1024, 32, SOFTMAX, True, True, 32, 7, 1.0, torch.bfloat16, True, False),
    # k larger than the kept groups' experts (the Python layer refuses it; the op still follows the reference:
    # the excluded experts come after, keys -inf, in expert order)
    ("k-beyond-kept-groups", 20, 16, 6, SOFTMAX, False, True, 4, 1, 1.0, torch.float32, False, False),
]


def route_case(case):
    name, tokens, experts, k, scoring, has_bias, renorm, groups, kept, scaling, dtype, ties, wide = case
    seed = sum(map(ord, name))
    logits = make_logits(tokens, experts, dtype, seed, ties, wide)
    bias = make_bias(experts, seed + 1, ties) if has_bias else None
    return logits, (k, scoring, bias, renorm, groups, kept, scaling)


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_topk_route_matches_reference(lib, case):
    logits, args = route_case(case)
    weights, ids, serial, agreed = host_route(lib, logits, *args)
    want_weights, want_ids = ref.moe_topk_route(logits, *args)
    assert agreed, "a warp butterfly ended with different values on different lanes"
    assert torch.equal(ids, serial), "the warp argmax rounds differ from the serial top-k"
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, **FP32_TOL)


def test_ties_resolve_to_the_lower_expert(lib):
    """All-equal rows, and rows whose top keys repeat across slots and lanes (experts e, e + 32, ...)."""
    experts = 100
    logits = torch.zeros(3, experts)
    logits[1, [5, 37, 69, 99]] = 1.0
    logits[2, :] = -1.0
    logits[2, [98, 2, 66]] = 0.0
    _, ids, _, agreed = host_route(lib, logits, 5, SOFTMAX, None, True, 0, 0, 1.0)
    assert agreed
    assert ids.tolist() == [[0, 1, 2, 3, 4], [5, 37, 69, 99, 0], [2, 66, 98, 0, 1]]


def test_grouped_keeps_the_groups_of_largest_top2_sum(lib):
    """DeepSeek-V3 rule by hand: the group with the single largest key loses to groups of larger top-2 sums."""
    experts, groups = 32, 4
    logits = torch.zeros(1, experts)
    bias = torch.zeros(experts)
    bias[0] = 5.0                  # group 0: top-2 sum 5.5 + 0.5 = 6.0
    bias[8:10] = 3.0               # group 1: 3.5 + 3.5 = 7.0
    bias[16:18] = torch.tensor([3.1, 3.0])  # group 2: 3.6 + 3.5 = 7.1
    weights, ids, _, _ = host_route(lib, logits, 3, SIGMOID, bias, True, groups, 2, 1.0)
    assert ids.tolist() == [[16, 8, 9]]
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3), **FP32_TOL)


def test_renormalize_and_scaling(lib):
    logits = make_logits(30, 40, torch.float32, seed=5)
    for renorm, scaling in [(True, 1.0), (True, 2.5), (False, 1.0), (False, 0.25)]:
        weights, ids, _, _ = host_route(lib, logits, 6, SIGMOID, None, renorm, 0, 0, scaling)
        scores = torch.sigmoid(logits).gather(1, ids.long())
        want = scores / scores.sum(1, keepdim=True) if renorm else scores
        torch.testing.assert_close(weights, want * scaling, **FP32_TOL)


def test_group_score_and_rank_helpers(lib):
    g = torch.Generator().manual_seed(11)
    for size in (1, 2, 5, 32, 125):
        keys = torch.randint(-4, 4, (size,), generator=g).float() * 0.5
        top = torch.sort(keys, descending=True).values
        assert lib.pk_group_score(_ptr(keys), size, 0) == float(top[0])
        assert lib.pk_group_score(_ptr(keys), size, 1) == float(top[:2].sum())
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, -2.0])
    kept = [[lib.pk_group_kept(_ptr(scores), 6, i, n) for i in range(6)] for n in (1, 2, 4)]
    assert kept == [[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0]]


def test_route_slots(lib):
    assert [lib.pk_route_slots(e) for e in (1, 32, 33, 60, 64, 65, 256, 257, 1000, 1024)] == \
        [1, 1, 2, 2, 2, 4, 8, 16, 32, 32]


# ---- moe_align_block_size --------------------------------------------------------------------------------------
def host_align(lib, ids, experts, block_size, expert_map, chunk_pairs=0):
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    pairs = flat.numel()
    capacity = -(-(pairs + experts * (block_size - 1)) // block_size) * block_size
    sorted_ids = torch.full((capacity,), -7, dtype=torch.int32)
    block_ids = torch.full((capacity // block_size,), -7, dtype=torch.int32)
    total = torch.full((1,), -7, dtype=torch.int32)
    emap = None if expert_map is None else expert_map.to(torch.int32).contiguous()
    chunks = lib.pk_align(_ptr(flat), pairs, experts, block_size, _ptr(emap), chunk_pairs, _ptr(sorted_ids),
                          _ptr(block_ids), _ptr(total))
    return (sorted_ids, block_ids, total), chunks


def make_ids(tokens, k, experts, seed, skew=False):
    """Distinct experts per token (top-k ids); `skew`: a few hot experts take most pairs."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(tokens, experts, generator=g)
    if skew:
        weights[:, : max(1, experts // 16)] += 4.0
    return torch.topk(weights, k, dim=1).indices.to(torch.int32)


def make_map(experts, seed):
    """Experts of this rank (about half) to local ids, the others -1."""
    g = torch.Generator().manual_seed(seed)
    local = torch.rand(experts, generator=g) < 0.5
    emap = torch.full((experts,), -1, dtype=torch.int32)
    emap[local] = torch.arange(int(local.sum()), dtype=torch.int32)
    return emap


ALIGN_CASES = [
    # id, tokens, k, E, block_size, map?, skew
    ("empty", 0, 2, 8, 16, False, False),
    ("one-pair", 1, 1, 4, 16, False, False),
    ("block-1", 37, 3, 7, 1, False, False),
    ("decode", 16, 8, 64, 16, False, False),
    ("prefill-3-chunks", 300, 8, 64, 16, False, False),
    ("skewed", 700, 4, 256, 64, False, True),
    ("expert-map", 500, 6, 128, 32, True, False),
    ("expert-map-skewed", 400, 8, 64, 128, True, True),
    ("many-empty-experts", 9, 2, 1000, 16, False, False),
]


@pytest.mark.parametrize("chunk_pairs", [0, 32, 40, 1000], ids=["default-chunks", "chunk32", "chunk40", "chunk1000"])
@pytest.mark.parametrize("case", ALIGN_CASES, ids=[c[0] for c in ALIGN_CASES])
def test_align_matches_reference_bit_for_bit(lib, case, chunk_pairs):
    name, tokens, k, experts, block_size, with_map, skew = case
    seed = sum(map(ord, name))
    ids = make_ids(tokens, k, experts, seed, skew)
    expert_map = make_map(experts, seed + 1) if with_map else None
    got, chunks = host_align(lib, ids, experts, block_size, expert_map, chunk_pairs)
    want = ref.moe_align_block_size(ids, experts, block_size, expert_map)
    for g, w, what in zip(got, want, ("sorted_ids", "block_expert_ids", "total")):
        assert g.dtype == torch.int32 and torch.equal(g, w), what
    pairs = ids.numel()
    assert chunks == (-(-pairs // chunk_pairs) if chunk_pairs else (-(-pairs // 1024) if pairs else 0))


def test_align_chunks_geometry(lib):
    out = torch.zeros(2, dtype=torch.int64)

    def chunks(pairs, experts):
        lib.pk_align_chunks(pairs, experts, _ptr(out))
        return tuple(out.tolist())

    assert chunks(0, 8) == (0, 1024)
    assert chunks(5, 8) == (1, 1024)
    assert chunks(5000, 256) == (5, 1024)
    assert chunks(1 << 24, 1024) == (1024, 16384)           # at most 1024 chunks
    assert chunks(1 << 20, 100_000) == (41, 25_600)         # at most 2^22 (chunk, expert) counts
    assert chunks(1 << 20, 1 << 23) == (1, 1 << 20)         # one chunk when even one row is that large
    count, per_chunk = chunks(3_000_001, 777)
    assert per_chunk % 32 == 0 and count * 777 <= 1 << 22 and (count - 1) * per_chunk < 3_000_001 <= count * per_chunk


# ---- the real kernels --------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not (_backend.cuda_built() and torch.cuda.is_available()),
                                reason="needs a GPU and pykernels._C built with the CUDA sources")


@needs_cuda
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_cuda_topk_route_on_device_matches_reference(case):
    logits, (k, scoring, bias, renorm, groups, kept, scaling) = route_case(case)
    cuda_bias = None if bias is None else bias.cuda()
    weights, ids = torch.ops.pykernels.moe_topk_route(logits.cuda(), k, scoring, cuda_bias, renorm, groups, kept,
                                                      scaling)
    want_weights, want_ids = ref.moe_topk_route(logits, k, scoring, bias, renorm, groups, kept, scaling)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.cpu(), want_weights, **FP32_TOL)


@needs_cuda
@pytest.mark.parametrize("case", ALIGN_CASES, ids=[c[0] for c in ALIGN_CASES])
def test_cuda_align_on_device_matches_reference(case):
    name, tokens, k, experts, block_size, with_map, skew = case
    seed = sum(map(ord, name))
    ids = make_ids(tokens, k, experts, seed, skew)
    expert_map = make_map(experts, seed + 1) if with_map else None
    got = torch.ops.pykernels.moe_align_block_size(ids.cuda(), experts, block_size,
                                                    None if expert_map is None else expert_map.cuda())
    want = ref.moe_align_block_size(ids, experts, block_size, expert_map)
    for g, w in zip(got, want):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), w)


@needs_cuda
def test_cuda_align_many_chunks_is_deterministic():
    """P = 2^20 pairs over 1024 chunks (one hot expert spans them all): equal to the reference, twice."""
    ids = make_ids(1 << 17, 8, 256, seed=3, skew=True)
    want = ref.moe_align_block_size(ids, 256, 64, None)
    for _ in range(2):
        got = torch.ops.pykernels.moe_align_block_size(ids.cuda(), 256, 64, None)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
