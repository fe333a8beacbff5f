// Device logic of the PBS-Attn forward kernel (csrc/cuda/attention.cu) that runs the same on the host, as PK_HD
// functions, so tests/test_cuda_attention_host.py runs exactly this code (tile by tile, in the kernel's order)
// against pykernels.reference.attention.pbs_block_attention:
//   * the work geometry (which query block a CTA takes, which keys a block and a tile hold, how many query rows
//     a pass of a CTA holds),
//   * the causal rule on original positions and the logit of one key column,
//   * the online-softmax state of one query row over tiles of logits and its final normalisation.
// Everything is float32 (expf / logf / fmaf). Element loads and stores are the exact conversions and
// round-to-nearest-even casts of common/fused_element.h.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace pykernels {

// ---- tile geometry ---------------------------------------------------------------------------------------
constexpr int kAttnWarps = 4;       // warps per CTA; each owns attn_rows_per_warp() query rows of a pass
constexpr int kAttnTileCols = 32;   // keys per tile: one per lane of a warp
constexpr int32_t kNoToken = 0x7FFFFFFF;  // token of a tile column past the key block: no row sees it

// Head dims are padded to 64, 128 or 256 (64, 80, 96, 128, 256 -> 64, 128, 128, 128, 256): one kernel per
// padded size keeps the accumulator of a lane a fixed-size register array.
PK_HD int padded_head_dim(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Query rows a warp holds at once (accumulator padded_d / 32 floats per row and lane); fewer for D = 256 so
// that the accumulators stay in registers and the query rows of a pass fit in shared memory.
PK_HD constexpr int attn_rows_per_warp(int padded_d) { return padded_d >= 256 ? 4 : 8; }
PK_HD constexpr int attn_rows_per_pass(int padded_d) { return kAttnWarps * attn_rows_per_warp(padded_d); }

// Work of CTA `cta` of the grid (B * Hq * nb CTAs): the head row b * Hq + h and the query block. The last query
// blocks of a head list the most key blocks (causal rule): they start first, the short ones fill the tail.
struct CtaWork {
  int64_t head_row;
  int64_t block;
};

PK_HD CtaWork cta_work(int64_t cta, int64_t nb) { return CtaWork{cta / nb, nb - 1 - cta % nb}; }

// Positions [begin, end) of block `block` (query or key block of size block_size; the last one is cut at n).
struct PositionRange {
  int64_t begin;
  int64_t end;
};

PK_HD PositionRange block_positions(int64_t block, int block_size, int64_t n) {
  const int64_t begin = block * block_size;
  const int64_t end = begin + block_size < n ? begin + block_size : n;
  return PositionRange{begin, end};
}

// Key columns of the tile starting at permuted position `tile_begin` of a key block ending at `block_end`.
PK_HD int tile_columns(int64_t tile_begin, int64_t block_end) {
  const int64_t left = block_end - tile_begin;
  return left < kAttnTileCols ? static_cast<int>(left) : kAttnTileCols;
}

// ---- logits ---------------------------------------------------------------------------------------------
// Causal rule on original positions: query row `row` sees the key of original token `token` iff row >= token
// (kNoToken, the filler of a short tile, is seen by no row).
PK_HD bool key_visible(int64_t row, int32_t token) { return row >= token; }

// float32 dot product of a query row and a key row (d elements), as four interleaved fused multiply-add
// chains (independent chains keep the FMA pipeline busy), summed pairwise at the end.
PK_HD float dot_f32(const float* a, const float* b, int d) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int e = 0;
  for (; e + 4 <= d; e += 4) {
    s0 = fmaf(a[e], b[e], s0);
    s1 = fmaf(a[e + 1], b[e + 1], s1);
    s2 = fmaf(a[e + 2], b[e + 2], s2);
    s3 = fmaf(a[e + 3], b[e + 3], s3);
  }
  for (; e < d; ++e) s0 = fmaf(a[e], b[e], s0);
  return (s0 + s1) + (s2 + s3);
}

// Logit of one key column: float32(q . k) * scale when the row sees the key, -inf (weight 0) otherwise. The
// dot product of an invisible key is not computed (nor is its key row needed).
PK_HD float masked_logit(bool visible, const float* q, const float* k, int d, float scale) {
  return visible ? dot_f32(q, k, d) * scale : -INFINITY;
}

// ---- online softmax of one query row ----------------------------------------------------------------------
// Running state after some tiles: m = max of the visible logits seen (-inf while none), l = sum over them of
// exp(logit - m). The accumulator acc[e] = sum of exp(logit - m) * v[e] lives with the caller.
struct SoftmaxRow {
  float m;
  float l;
};

PK_HD SoftmaxRow softmax_row_start() { return SoftmaxRow{-INFINITY, 0.f}; }

// Move to a new tile whose largest logit is tile_max: the new running max and the factor that rescales l and
// the accumulator from the old max to it.
struct SoftmaxStep {
  float m;
  float rescale;
};

PK_HD SoftmaxStep softmax_step(SoftmaxRow row, float tile_max) {
  const float m = fmaxf(row.m, tile_max);
  // Nothing visible yet (m = -inf): keep l = 0, acc = 0 as they are; exp(-inf - (-inf)) would be NaN.
  if (m == -INFINITY) return SoftmaxStep{m, 1.f};
  return SoftmaxStep{m, expf(row.m - m)};  // row.m = -inf (first visible tile): factor 0 of an empty sum
}

// Weight of one logit of the tile relative to the new max (0 for a masked logit, and for every logit while
// the row has seen no visible key).
PK_HD float softmax_weight(float logit, SoftmaxStep step) {
  return step.m == -INFINITY ? 0.f : expf(logit - step.m);
}

// State after the tile: tile_sum = sum of the tile's weights.
PK_HD SoftmaxRow softmax_advance(SoftmaxRow row, SoftmaxStep step, float tile_sum) {
  return SoftmaxRow{step.m, row.l * step.rescale + tile_sum};
}

PK_HD float rescale_accumulator(float acc, SoftmaxStep step) { return acc * step.rescale; }

// acc += p * v (one key of the tile, one element of the row).
PK_HD float accumulate_value(float acc, float p, float v) { return fmaf(p, v, acc); }

// Final normalisation: out = acc / l, and 0 for a row that saw no visible key (m = -inf, l = 0, acc = 0).
PK_HD float softmax_output(float acc, SoftmaxRow row) { return row.m == -INFINITY ? 0.f : acc / row.l; }

// Natural-log log-sum-exp of the row's visible logits: m + log(l), -inf for a row that saw none.
PK_HD float softmax_lse(SoftmaxRow row) { return row.m == -INFINITY ? -INFINITY : row.m + logf(row.l); }

}  // namespace pykernels
