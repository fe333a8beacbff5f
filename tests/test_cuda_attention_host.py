"""Host tests of the CUDA PBS-Attn forward kernel's device logic (no GPU needed).

csrc/cuda/attention.cu keeps its arithmetic and work geometry in the PK_HD helpers of
csrc/common/online_softmax.h (and the element conversions of csrc/common/fused_element.h). A harness compiled
here with g++ (ctypes, no torch headers) runs those helpers in the kernel's order -- CTA -> (head, query block),
passes of query rows, the listed key blocks in tiles of 32 keys, the tile-skip rule, lane-per-key logits, the
warp reductions as xor butterflies, online-softmax steps, accumulation, final normalisation and the dtype
store -- and the results are compared with pykernels.reference.attention.pbs_block_attention (float32
round-off for float32 outputs, one rounding step of the output dtype for bf16/fp16).
Not exercised here: shared memory, __syncthreads, shuffles, launch configuration (tools/check_cuda.sh compiles
those). With a GPU and a CUDA build, the last test runs the kernel itself on the same cases.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from pykernels import _backend
from pykernels.attention import pbs_plan
from pykernels.reference import attention as ref

from conftest import FP32_TOL, tol_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

HARNESS = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/fused_element.h"
#include "common/online_softmax.h"

using namespace pykernels;

namespace {

constexpr int kLanes = 32;

// The kernel's warp reductions run lane by lane: an xor butterfly, every lane combining its value with its
// partner's at each step, so the floating-point operations happen in the kernel's order.
template <typename Combine>
float butterfly(const float* values, Combine combine) {
  float lanes[kLanes];
  std::copy(values, values + kLanes, lanes);
  for (int offset = 16; offset > 0; offset >>= 1) {
    float next[kLanes];
    for (int l = 0; l < kLanes; ++l) next[l] = combine(lanes[l], lanes[l ^ offset]);
    std::copy(next, next + kLanes, lanes);
  }
  return lanes[0];
}

float warp_max(const float* v) { return butterfly(v, [](float a, float b) { return fmaxf(a, b); }); }
float warp_sum(const float* v) { return butterfly(v, [](float a, float b) { return a + b; }); }

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const int64_t* q_strides;
  const int64_t* k_strides;
  const int64_t* v_strides;
  const int32_t* perm;
  const int64_t* offsets;
  const int32_t* indices;
  int heads_q, heads_kv;
  int64_t n;
  int d, block_size;
  float scale;
  int dtype;
};

// One query row's state and accumulator (element col = lane + 32 * e of the padded head dim).
struct RowState {
  SoftmaxRow softmax;
  std::vector<float> acc;
};

// One tile for one query row: lane c's logit, the warp max, the step, lane weights, the warp sum, then the
// rescale and the accumulation over the tile's columns in order (attend_tile of attention.cu).
void attend_tile_row(RowState& row_state, int64_t row, const float* query, const std::vector<float>& key,
                     const std::vector<float>& value, const int32_t* token, int cols, int pd, int d, float scale) {
  float logit[kLanes], p[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    logit[lane] = masked_logit(key_visible(row, token[lane]), query, &key[lane * (pd + 1)], d, scale);
  }
  const float tile_max = warp_max(logit);
  if (tile_max == -INFINITY) return;
  const SoftmaxStep step = softmax_step(row_state.softmax, tile_max);
  for (int lane = 0; lane < kLanes; ++lane) p[lane] = softmax_weight(logit[lane], step);
  row_state.softmax = softmax_advance(row_state.softmax, step, warp_sum(p));
  for (float& acc : row_state.acc) acc = rescale_accumulator(acc, step);
  for (int c = 0; c < cols; ++c) {
    for (int col = 0; col < pd; ++col) {
      row_state.acc[col] = accumulate_value(row_state.acc[col], p[c], value[c * pd + col]);
    }
  }
}

// One pass of a CTA: query rows [row_begin, row_end) over the listed key blocks (attend_pass of attention.cu).
void attend_pass(const Args& a, int64_t q_base, int64_t k_base, int64_t v_base, const int32_t* perm,
                 int64_t list_begin, int64_t list_end, int64_t row_begin, int64_t row_end, int64_t out_row0,
                 void* out, float* lse, int64_t* tiles_done, int64_t* tiles_skipped) {
  const int pd = padded_head_dim(a.d);
  const int rows = attn_rows_per_pass(pd);
  std::vector<float> query(static_cast<size_t>(rows) * pd, 0.f);
  for (int64_t r = 0; r < row_end - row_begin; ++r) {
    for (int e = 0; e < a.d; ++e) {
      query[r * pd + e] = load_as_float(a.q, a.dtype, q_base + (row_begin + r) * a.q_strides[2] + e);
    }
  }
  std::vector<RowState> state(rows, RowState{softmax_row_start(), std::vector<float>(pd, 0.f)});
  std::vector<float> key(kAttnTileCols * (pd + 1)), value(kAttnTileCols * pd);
  int32_t token[kAttnTileCols];
  const int64_t last_row = row_end - 1;
  for (int64_t listed = list_begin; listed < list_end; ++listed) {
    const PositionRange keys = block_positions(a.indices[listed], a.block_size, a.n);
    for (int64_t tile_begin = keys.begin; tile_begin < keys.end; tile_begin += kAttnTileCols) {
      const int cols = tile_columns(tile_begin, keys.end);
      for (int c = 0; c < kAttnTileCols; ++c) token[c] = c < cols ? perm[tile_begin + c] : kNoToken;
      if (!key_visible(last_row, *std::min_element(token, token + kAttnTileCols))) {
        ++*tiles_skipped;
        continue;
      }
      ++*tiles_done;
      for (int c = 0; c < kAttnTileCols; ++c) {
        for (int e = 0; e < pd; ++e) {
          const bool read = e < a.d && key_visible(last_row, token[c]);
          const int64_t k_at = k_base + int64_t(token[c]) * a.k_strides[2] + e;
          const int64_t v_at = v_base + int64_t(token[c]) * a.v_strides[2] + e;
          key[c * (pd + 1) + e] = read ? load_as_float(a.k, a.dtype, k_at) : 0.f;
          value[c * pd + e] = read ? load_as_float(a.v, a.dtype, v_at) : 0.f;
        }
      }
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int local = static_cast<int>(r - row_begin);
        attend_tile_row(state[local], r, &query[local * pd], key, value, token, cols, pd, a.d, a.scale);
      }
    }
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const RowState& s = state[r - row_begin];
    for (int col = 0; col < a.d; ++col) {
      store_from_float(out, a.dtype, (out_row0 + r) * a.d + col, softmax_output(s.acc[col], s.softmax));
    }
    lse[out_row0 + r] = softmax_lse(s.softmax);
  }
}

}  // namespace

extern "C" {

// pbs_block_attention_kernel over the whole grid, CTA by CTA. counters: (tiles computed, tiles skipped).
void pk_block_attention(const void* q, const void* k, const void* v, const int64_t* q_strides,
                        const int64_t* k_strides, const int64_t* v_strides, const int32_t* perm,
                        const int64_t* offsets, const int32_t* indices, int batch, int heads_q, int heads_kv,
                        int64_t n, int d, int block_size, float scale, int dtype, void* out, float* lse,
                        int64_t* counters) {
  const Args a{q, k, v, q_strides, k_strides, v_strides, perm, offsets, indices, heads_q, heads_kv, n, d,
               block_size, scale, dtype};
  const int64_t nb = (n + block_size - 1) / block_size;
  const int rows_per_pass = attn_rows_per_pass(padded_head_dim(d));
  counters[0] = counters[1] = 0;
  for (int64_t cta = 0; cta < int64_t(batch) * heads_q * nb; ++cta) {
    const CtaWork work = cta_work(cta, nb);
    const int64_t b = work.head_row / heads_q, h = work.head_row % heads_q, hkv = h / (heads_q / heads_kv);
    const int64_t plan_row = work.head_row * nb + work.block;
    const PositionRange rows = block_positions(work.block, block_size, n);
    for (int64_t row_begin = rows.begin; row_begin < rows.end; row_begin += rows_per_pass) {
      attend_pass(a, b * q_strides[0] + h * q_strides[1], b * k_strides[0] + hkv * k_strides[1],
                  b * v_strides[0] + hkv * v_strides[1], perm + (b * heads_kv + hkv) * n, offsets[plan_row],
                  offsets[plan_row + 1], row_begin, std::min<int64_t>(row_begin + rows_per_pass, rows.end),
                  work.head_row * n, out, lse, &counters[0], &counters[1]);
    }
  }
}

// The online softmax of one row alone: logits (n, -inf = masked) and values (n, d) in tiles of `tile` <= 32
// columns (columns past a short tile are masked lanes), reductions as the warp's butterflies.
void pk_row_softmax(const float* logits, const float* values, int n, int d, int tile, float* out, float* lse) {
  SoftmaxRow row = softmax_row_start();
  std::vector<float> acc(d, 0.f);
  for (int begin = 0; begin < n; begin += tile) {
    const int cols = std::min(tile, n - begin);
    float lane_logit[kLanes], p[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) lane_logit[lane] = lane < cols ? logits[begin + lane] : -INFINITY;
    const float tile_max = warp_max(lane_logit);
    if (tile_max == -INFINITY) continue;
    const SoftmaxStep step = softmax_step(row, tile_max);
    for (int lane = 0; lane < kLanes; ++lane) p[lane] = softmax_weight(lane_logit[lane], step);
    row = softmax_advance(row, step, warp_sum(p));
    for (int e = 0; e < d; ++e) {
      acc[e] = rescale_accumulator(acc[e], step);
      for (int c = 0; c < cols; ++c) acc[e] = accumulate_value(acc[e], p[c], values[(begin + c) * d + e]);
    }
  }
  for (int e = 0; e < d; ++e) out[e] = softmax_output(acc[e], row);
  *lse = softmax_lse(row);
}

// softmax_step / softmax_weight / softmax_advance / softmax_output / softmax_lse on given values.
void pk_softmax_step(float m, float l, float tile_max, float logit, float tile_sum, float acc, float* result) {
  const SoftmaxRow row{m, l};
  const SoftmaxStep step = softmax_step(row, tile_max);
  const SoftmaxRow next = softmax_advance(row, step, tile_sum);
  result[0] = step.m;
  result[1] = step.rescale;
  result[2] = softmax_weight(logit, step);
  result[3] = next.m;
  result[4] = next.l;
  result[5] = softmax_output(acc, next);
  result[6] = softmax_lse(next);
}

int pk_padded_head_dim(int d) { return padded_head_dim(d); }
int pk_rows_per_pass(int padded_d) { return attn_rows_per_pass(padded_d); }

}  // extern "C"
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the host harness")
    tmp = tmp_path_factory.mktemp("cuda_attention_host")
    src, so = tmp / "harness.cpp", tmp / "harness.so"
    src.write_text(HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-shared", "-fPIC",
           "-I", CSRC, str(src), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"harness build failed:\n{' '.join(cmd)}\n{done.stderr}"
    h = ctypes.CDLL(str(so))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    h.pk_block_attention.argtypes = [p, p, p, p, p, p, p, p, p, i32, i32, i32, i64, i32, i32, f32, i32, p, p, p]
    h.pk_block_attention.restype = None
    h.pk_row_softmax.argtypes = [p, p, i32, i32, i32, p, p]
    h.pk_row_softmax.restype = None
    h.pk_softmax_step.argtypes = [f32, f32, f32, f32, f32, f32, p]
    h.pk_softmax_step.restype = None
    h.pk_padded_head_dim.argtypes = [i32]
    h.pk_padded_head_dim.restype = i32
    h.pk_rows_per_pass.argtypes = [i32]
    h.pk_rows_per_pass.restype = i32
    return h


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def host_attention(lib, q, k, v, perm, offsets, indices, block_size, scale):
    """(out, lse, (tiles computed, tiles skipped)) of the harness; q, k, v may be strided (last dim contiguous)."""
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    batch, hq, n, d = q.shape
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # every element must be written
    lse = torch.full((batch, hq, n), float("nan"), dtype=torch.float32)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    perm, offsets, indices = perm.contiguous(), offsets.contiguous(), indices.contiguous()
    counters = torch.zeros(2, dtype=torch.int64)
    lib.pk_block_attention(_ptr(q), _ptr(k), _ptr(v), *[_ptr(s) for s in strides], _ptr(perm), _ptr(offsets),
                           _ptr(indices), batch, hq, k.shape[1], n, d, block_size, scale, DTYPE_CODES[q.dtype],
                           _ptr(out), _ptr(lse), _ptr(counters))
    return out, lse, tuple(counters.tolist())


def make_qkv(batch, hq, hkv, n, d, dtype, seed, strided=False):
    """Random q, k, v; `strided`: (B, N, H, D) storage seen as (B, H, N, D) (token stride H * D)."""
    g = torch.Generator().manual_seed(seed)

    def one(h):
        if strided:
            return torch.randn(batch, n, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, n, d, generator=g).to(dtype)

    return one(hq), one(hkv), one(hkv)


def random_plan(batch, hq, hkv, n, block_size, seed, empty_rows=0.1):
    """Random permutation of every (batch, kv head) and, per query block, a random subset of the key blocks in
    random order (some rows empty)."""
    g = torch.Generator().manual_seed(seed)
    nb = ref.num_blocks(n, block_size)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(batch * hkv)]).view(batch, hkv, n).int()
    lists = []
    for _ in range(batch * hq * nb):
        if float(torch.rand(1, generator=g)) < empty_rows:
            lists.append(torch.zeros(0, dtype=torch.int32))
            continue
        chosen = torch.randperm(nb, generator=g)[: int(torch.randint(1, nb + 1, (1,), generator=g))]
        lists.append(chosen.int())
    offsets = torch.tensor([0] + [len(x) for x in lists], dtype=torch.int64).cumsum(0)
    return perm, offsets, torch.cat(lists)


def check_against_reference(lib, q, k, v, perm, offsets, indices, block_size, scale):
    got, got_lse, counters = host_attention(lib, q, k, v, perm, offsets, indices, block_size, scale)
    want, want_lse = ref.pbs_block_attention(q, k, v, perm, offsets, indices, block_size, scale)
    assert not got.isnan().any() and not got_lse.isnan().any(), "unwritten or NaN outputs"
    torch.testing.assert_close(got.float(), want.float(), **tol_for(q.dtype))
    torch.testing.assert_close(got_lse, want_lse, **FP32_TOL)  # -inf rows must match exactly
    return got, got_lse, counters


# ---------------------------------------------------------------------------------------------------------
CASES = [
    # batch, hq, hkv, n, d, block_size, dtype, strided
    (2, 4, 2, 100, 64, 16, torch.float32, False),
    (1, 2, 1, 130, 80, 32, torch.float32, True),
    (1, 3, 3, 200, 96, 64, torch.bfloat16, False),
    (2, 2, 1, 300, 128, 128, torch.float16, True),   # 4 tiles per key block, last block cut
    (1, 2, 2, 150, 256, 128, torch.float32, False),  # D = 256: 16-row passes, 8 per query block
    (1, 4, 1, 64, 256, 16, torch.bfloat16, True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_random_plans_match_reference(lib, case):
    batch, hq, hkv, n, d, block_size, dtype, strided = CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, n, d, dtype, seed=case, strided=strided)
    perm, offsets, indices = random_plan(batch, hq, hkv, n, block_size, seed=100 + case)
    _, lse, (done, skipped) = check_against_reference(lib, q, k, v, perm, offsets, indices, block_size,
                                                      1 / math.sqrt(d))
    assert done > 0
    assert torch.isneginf(lse).any(), "the random plans hold rows that see no key"


@pytest.mark.parametrize("block_size,segment_size,threshold", [(16, 64, 0.5), (32, 64, 0.9), (64, 128, 0.0)])
def test_reference_planner_plans_match_reference(lib, block_size, segment_size, threshold):
    """Plans as pbs_plan makes them: permuted segments, own-segment blocks partly after the query rows."""
    q, k, v = make_qkv(1, 4, 2, 333, 64, torch.float32, seed=block_size)
    plan = pbs_plan(q, k, block_size=block_size, segment_size=segment_size, threshold=threshold,
                    backend="reference")
    _, _, (done, skipped) = check_against_reference(lib, q, k, v, plan.perm, plan.offsets, plan.indices,
                                                    block_size, 0.125)
    assert done > 0
    # Blocks of <= 32 keys are one tile and their query block one pass: the planner lists a block only when it
    # holds a key at or before the query block's last row, so nothing is skipped. Larger blocks split into
    # tiles and passes, and some own-segment tiles come entirely after a pass's rows (seeded data: 4 here).
    assert (skipped > 0) == (block_size > 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_causal_plan_equals_sdpa(lib, dtype):
    """Identity permutation and every block j <= i listed (in descending order): causal attention."""
    batch, hq, hkv, n, d, bs = 1, 4, 2, 200, 64, 32
    q, k, v = make_qkv(batch, hq, hkv, n, d, dtype, seed=7)
    nb = ref.num_blocks(n, bs)
    perm = torch.arange(n, dtype=torch.int32).repeat(batch, hkv, 1)
    lists = [torch.arange(i, -1, -1, dtype=torch.int32) for _ in range(batch * hq) for i in range(nb)]
    offsets = torch.tensor([0] + [len(x) for x in lists], dtype=torch.int64).cumsum(0)
    out, lse, _ = host_attention(lib, q, k, v, perm, offsets, torch.cat(lists), bs, 1 / math.sqrt(d))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.float(), want.to(dtype).float(), **tol_for(dtype))
    logits = q.float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), **FP32_TOL)


def test_rows_that_see_no_key(lib):
    """Empty lists, and lists whose keys all come after the rows: out exactly 0, lse -inf, no NaN."""
    n, bs, d = 96, 16, 64
    q, k, v = make_qkv(1, 2, 1, n, d, torch.float32, seed=3)
    nb = n // bs
    perm = torch.arange(n, dtype=torch.int32).view(1, 1, n)
    # head 0: block i lists only the last block (unseen by every block but the last); head 1: nothing
    lists = [torch.tensor([nb - 1], dtype=torch.int32) for _ in range(nb)] + [torch.zeros(0, dtype=torch.int32)] * nb
    offsets = torch.tensor([0] + [len(x) for x in lists], dtype=torch.int64).cumsum(0)
    out, lse, (done, skipped) = check_against_reference(lib, q, k, v, perm, offsets, torch.cat(lists), bs, 0.125)
    assert torch.equal(out[0, 0, : n - bs], torch.zeros(n - bs, d))
    assert torch.isneginf(lse[0, 0, : n - bs]).all() and torch.isfinite(lse[0, 0, n - bs:]).all()
    assert torch.equal(out[0, 1], torch.zeros(n, d)) and torch.isneginf(lse[0, 1]).all()
    assert (done, skipped) == (1, nb - 1)


def test_partly_visible_tile_and_rows_before_every_key(lib):
    """A reversed permutation: within a tile some keys are visible to a row and some not, and in block 0 the
    first rows see only some keys; the query rows of a pass all see different key sets."""
    n, bs, d = 64, 64, 80
    q, k, v = make_qkv(1, 1, 1, n, d, torch.float32, seed=4)
    perm = torch.arange(n - 1, -1, -1, dtype=torch.int32).view(1, 1, n)
    offsets = torch.tensor([0, 1], dtype=torch.int64)
    indices = torch.tensor([0], dtype=torch.int32)
    out, lse, (done, skipped) = check_against_reference(lib, q, k, v, perm, offsets, indices, bs, 0.1)
    assert (done, skipped) == (3, 1) and torch.isfinite(lse).all()  # pass 1 (rows 0..31) skips tokens 63..32


def _row_reference(logits, values):
    lse = torch.logsumexp(logits.double(), 0)
    if torch.isneginf(lse):
        return torch.zeros(values.shape[1], dtype=torch.float64), lse
    return torch.softmax(logits.double(), 0) @ values.double(), lse


@pytest.mark.parametrize("tile", [1, 7, 16, 32])
def test_row_online_softmax_over_tiles(lib, tile):
    """The helpers alone on one row: masked columns, whole masked tiles before and after visible ones, a max
    that jumps up in a later tile (rescale), tiny weights, and an all-masked row."""
    g = torch.Generator().manual_seed(tile)
    n, d = 150, 24
    values = torch.randn(n, d, generator=g)
    rows = []
    logits = 3 * torch.randn(n, generator=g)
    logits[torch.rand(n, generator=g) < 0.3] = -math.inf
    rows.append(logits)
    late = logits.clone()
    late[:64] = -math.inf          # nothing visible in the first tiles
    late[120] = 40.0               # the max jumps in a late tile
    rows.append(late)
    rows.append(torch.linspace(-80, 5, n))  # weights from ~1 down to ~exp(-85) (underflow to 0)
    rows.append(torch.full((n,), -math.inf))
    for logits in rows:
        out = torch.empty(d, dtype=torch.float32)
        lse = ctypes.c_float()
        lib.pk_row_softmax(_ptr(logits), _ptr(values), n, d, tile, _ptr(out), ctypes.byref(lse))
        want, want_lse = _row_reference(logits, values)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        if math.isinf(want_lse):
            assert lse.value == -math.inf and torch.equal(out, torch.zeros(d))
        else:
            assert abs(lse.value - float(want_lse)) <= 1e-5 * max(1.0, abs(float(want_lse)))


def test_softmax_step_edge_values(lib):
    inf = math.inf
    result = (ctypes.c_float * 7)()

    def step(m, l, tile_max, logit, tile_sum, acc):
        lib.pk_softmax_step(m, l, tile_max, logit, tile_sum, acc, result)
        return list(result)

    # nothing visible before or in the tile: state (-inf, 0), weight 0, out 0, lse -inf, no NaN anywhere
    assert step(-inf, 0.0, -inf, -inf, 0.0, 0.0) == [-inf, 1.0, 0.0, -inf, 0.0, 0.0, -inf]
    # first visible tile: the old (empty) sum is scaled by 0, the tile's max has weight 1
    assert step(-inf, 0.0, 2.0, 2.0, 1.0, 3.0) == [2.0, 0.0, 1.0, 2.0, 1.0, 3.0, 2.0]
    # a masked logit in a visible tile has weight 0
    assert step(1.0, 2.0, 0.5, -inf, 0.0, 4.0)[2] == 0.0
    # a higher max: l and acc rescaled by exp(old - new)
    m, rescale, weight, m2, l2, out, lse = step(1.0, 2.0, 3.0, 3.0, 1.5, 4.0)
    assert (m, m2, weight) == (3.0, 3.0, 1.0)
    assert rescale == pytest.approx(math.exp(-2.0), rel=1e-6)
    assert l2 == pytest.approx(2.0 * math.exp(-2.0) + 1.5, rel=1e-6)
    assert out == pytest.approx(4.0 / l2, rel=1e-6) and lse == pytest.approx(3.0 + math.log(l2), rel=1e-6)
    # an all-masked tile after visible ones leaves the state as it was
    assert step(1.0, 2.0, -inf, -inf, 0.0, 4.0)[1:5] == [1.0, 0.0, 1.0, 2.0]


def test_padded_head_dims(lib):
    assert [lib.pk_padded_head_dim(d) for d in (64, 80, 96, 128, 256)] == [64, 128, 128, 128, 256]
    assert [lib.pk_rows_per_pass(p) for p in (64, 128, 256)] == [32, 32, 16]


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (_backend.cuda_built() and torch.cuda.is_available()),
                    reason="needs a GPU and pykernels._C built with the CUDA sources")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_kernel_on_device_matches_reference(case):
    """The kernel itself (torch.ops.pykernels.pbs_block_attention on CUDA tensors) on the cases above."""
    batch, hq, hkv, n, d, block_size, dtype, strided = CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, n, d, dtype, seed=case, strided=strided)
    perm, offsets, indices = random_plan(batch, hq, hkv, n, block_size, seed=100 + case)
    scale = 1 / math.sqrt(d)
    cuda = [t.cuda() for t in (q, k, v, perm, offsets, indices)]
    out, lse = torch.ops.pykernels.pbs_block_attention(*cuda, block_size, scale)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    want, want_lse = ref.pbs_block_attention(q, k, v, perm, offsets, indices, block_size, scale)
    torch.testing.assert_close(out.cpu().float(), want.float(), **tol_for(dtype))
    torch.testing.assert_close(lse.cpu(), want_lse, **FP32_TOL)
