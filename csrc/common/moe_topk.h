// Device logic of the MoE routing kernels (csrc/cuda/moe.cu) that runs the same on the host, as PK_HD functions,
// so tests/test_cuda_moe_host.py runs exactly this code, lane by lane and in the kernels' order, against
// pykernels.reference.moe (contract: docs/PRIMITIVES.md "MoE routing").
//
// moe_topk_route: one warp per token. Lane l holds the experts e = slot * 32 + l of its `slots` register slots
// (route_slots(E) of them); everything per lane below takes those register arrays. The rule:
//   * scores s in float32: softmax (exp(x - max) / sum) or sigmoid (1 / (1 + exp(-x)));
//   * selection key: the logit x without a bias, s + bias with one (softmax and sigmoid keep the logits' order,
//     so without a bias the logits are the keys and ties are exact ties of the logits);
//   * candidates are ordered by (key descending, expert ascending): a total order, so the k winners and their
//     order do not depend on the order in which lanes or a warp reduction compare them;
//   * grouped routing: a group scores its largest key (no bias) or the float32 sum of its two largest keys (with
//     a bias); the topk_groups first groups in the same order on (score desc, group asc) stay, the keys of the
//     other experts become -inf (they stay candidates, after every kept expert, as in the reference);
//   * weights: the s of the winners, divided by their float32 sum in winner order (unless 0), times scaling.
//
// moe_align_block_size: the bookkeeping of the count / scan / scatter kernels: chunk geometry, padded runs, the
// expert_map rule, per-chunk column scans, and the in-warp stable rank of a pair among its expert's pairs.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace pykernels {

// ---- geometry of moe_topk_route -------------------------------------------------------------------------
constexpr int kMoeLanes = 32;
constexpr int kMoeMaxK = 32;
constexpr int kMoeMaxExperts = 1024;
constexpr int kMoeMaxSlots = kMoeMaxExperts / kMoeLanes;
constexpr int32_t kNoExpert = 0x7FFFFFFF;  // id of "no candidate": loses every tie against a real expert

enum MoeScoring : int { kMoeSoftmax = 0, kMoeSigmoid = 1 };

// Register slots per lane for E experts: ceil(E / 32) rounded up to a power of two (1, 2, 4, 8, 16, 32), so
// six kernel variants cover every E <= 1024.
PK_HD int route_slots(int experts) {
  int slots = 1;
  while (slots * kMoeLanes < experts) slots *= 2;
  return slots;
}

// Expert (or group) held by `lane` in `slot`: consecutive lanes hold consecutive experts (coalesced loads).
PK_HD int lane_expert(int lane, int slot) { return slot * kMoeLanes + lane; }

// Bit `slot` set for the slots of `lane` past the last of `count` items: never loaded, never selected.
PK_HD uint32_t unused_slots(int lane, int count, int slots) {
  uint32_t unused = 0;
  for (int slot = 0; slot < slots; ++slot) {
    if (lane_expert(lane, slot) >= count) unused |= 1u << slot;
  }
  return unused;
}

PK_HD bool slot_used(uint32_t unused, int slot) { return ((unused >> slot) & 1u) == 0; }

// ---- scores and keys -------------------------------------------------------------------------------------
PK_HD float softmax_numerator(float x, float row_max) { return expf(x - row_max); }
PK_HD float softmax_score(float numerator, float denominator) { return numerator / denominator; }
PK_HD float sigmoid_score(float x) { return 1.f / (1.f + expf(-x)); }

// Without a bias the logit itself is the key (same order as its score, and no rounding of exp in the way).
PK_HD float selection_key(float x, float score, bool has_bias, float bias) { return has_bias ? score + bias : x; }

// Largest logit of the lane's slots (-inf for a lane with none).
template <int kSlots>
PK_HD float lane_logit_max(const float (&x)[kSlots], uint32_t unused) {
  float m = -INFINITY;
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    if (slot_used(unused, slot)) m = fmaxf(m, x[slot]);
  }
  return m;
}

// numerator[slot] = exp(x - row_max); returns the lane's float32 sum of them in ascending slot order (the
// warp then adds the 32 lane sums in an xor butterfly).
template <int kSlots>
PK_HD float lane_softmax_numerators(const float (&x)[kSlots], float row_max, uint32_t unused,
                                    float (&numerator)[kSlots]) {
  float sum = 0.f;
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    numerator[slot] = 0.f;
    if (slot_used(unused, slot)) {
      numerator[slot] = softmax_numerator(x[slot], row_max);
      sum += numerator[slot];
    }
  }
  return sum;
}

// Softmax scores of the used slots, in place: numerator / row sum (0 in unused slots).
template <int kSlots>
PK_HD void lane_softmax_scores(float row_sum, float (&numerator_to_score)[kSlots]) {
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    numerator_to_score[slot] = softmax_score(numerator_to_score[slot], row_sum);
  }
}

// Sigmoid scores of the used slots (0 in unused slots).
template <int kSlots>
PK_HD void lane_sigmoid_scores(const float (&x)[kSlots], uint32_t unused, float (&score)[kSlots]) {
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) score[slot] = slot_used(unused, slot) ? sigmoid_score(x[slot]) : 0.f;
}

// key[slot] of every used slot (bias: float32 (E,) or nullptr). Unused slots get -inf (never read: taken).
template <int kSlots>
PK_HD void lane_keys(const float (&x)[kSlots], const float (&score)[kSlots], const float* bias, int lane,
                     uint32_t unused, float (&key)[kSlots]) {
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    const bool used = slot_used(unused, slot);
    const float b = bias != nullptr && used ? bias[lane_expert(lane, slot)] : 0.f;
    key[slot] = used ? selection_key(x[slot], score[slot], bias != nullptr, b) : -INFINITY;
  }
}

// ---- the selection order ---------------------------------------------------------------------------------
// A candidate expert (or group): its key, its index and the score it carries as a weight.
struct RouteCandidate {
  float key;
  int32_t id;
  float score;
};

PK_HD RouteCandidate no_candidate() { return RouteCandidate{-INFINITY, kNoExpert, 0.f}; }

// a comes before b: larger key, or an equal key and a lower index (+0 and -0 are equal keys, as in torch.sort).
PK_HD bool precedes(const RouteCandidate& a, const RouteCandidate& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}

// The first of two candidates in the selection order: the combine of the warp's argmax butterfly.
PK_HD RouteCandidate first_of(const RouteCandidate& a, const RouteCandidate& b) { return precedes(b, a) ? b : a; }

// The lane's first candidate among its used slots not yet taken (bit `slot` of `taken`), no_candidate() if none.
template <int kSlots>
PK_HD RouteCandidate lane_best(const float (&key)[kSlots], const float (&score)[kSlots], uint32_t taken,
                               int lane) {
  RouteCandidate best = no_candidate();
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    if ((taken >> slot) & 1u) continue;
    best = first_of(best, RouteCandidate{key[slot], lane_expert(lane, slot), score[slot]});
  }
  return best;
}

// After a round the lane owning the warp's winner takes that slot out of the competition.
PK_HD uint32_t take_winner(uint32_t taken, const RouteCandidate& winner, int lane) {
  if (winner.id == kNoExpert || winner.id % kMoeLanes != lane) return taken;
  return taken | (1u << (winner.id / kMoeLanes));
}

// The serial statement of the same rule: the first kCap candidates, in the selection order, of any sequence of
// inserted candidates (whatever the insertion order). The list starts full of no_candidate() fillers, and an
// insertion is one unrolled compare-and-swap pass, so every index is a compile-time constant and a small list
// stays in registers on the device. group_score() keeps a group's top 1 or 2 with it; the host test checks the
// kernel's warp rounds against it at k up to 32.
template <int kCap>
struct SortedTopK {
  RouteCandidate item[kCap];

  PK_HD SortedTopK() {
#pragma unroll
    for (int i = 0; i < kCap; ++i) item[i] = no_candidate();
  }

  PK_HD void insert(const RouteCandidate& c) {
    if (!precedes(c, item[kCap - 1])) return;
    item[kCap - 1] = c;
#pragma unroll
    for (int i = kCap - 1; i > 0; --i) {
      if (precedes(item[i], item[i - 1])) {
        const RouteCandidate moved = item[i];
        item[i] = item[i - 1];
        item[i - 1] = moved;
      }
    }
  }
};

// ---- grouped routing -----------------------------------------------------------------------------------
// Score of the group whose `size` keys are keys[0 .. size): its largest key without a bias, the float32 sum of
// its two largest with one (the largest alone when size == 1).
PK_HD float group_score(const float* keys, int size, bool has_bias) {
  if (!has_bias || size == 1) {
    SortedTopK<1> top;
    for (int i = 0; i < size; ++i) top.insert(RouteCandidate{keys[i], i, 0.f});
    return top.item[0].key;
  }
  SortedTopK<2> top;
  for (int i = 0; i < size; ++i) top.insert(RouteCandidate{keys[i], i, 0.f});
  return top.item[0].key + top.item[1].key;
}

// Whether group g is among the `kept` first groups in the selection order of (score desc, group asc): fewer
// than `kept` groups come before it.
PK_HD bool group_kept(const float* scores, int groups, int g, int kept) {
  const RouteCandidate mine{scores[g], g, 0.f};
  int before = 0;
  for (int h = 0; h < groups; ++h) before += precedes(RouteCandidate{scores[h], h, 0.f}, mine) ? 1 : 0;
  return before < kept;
}

// Keys of the experts of groups not kept (kept[g] == 0) become -inf.
template <int kSlots>
PK_HD void lane_mask_groups(const uint8_t* kept, int group_size, int lane, uint32_t unused, float (&key)[kSlots]) {
#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    if (slot_used(unused, slot) && kept[lane_expert(lane, slot) / group_size] == 0) key[slot] = -INFINITY;
  }
}

// ---- weights ---------------------------------------------------------------------------------------------
// Weight of a winner: its score, divided by the winners' float32 sum `total` when renormalizing (a zero sum is
// left alone), times scaling.
PK_HD float route_weight(float score, float total, bool renormalize, float scaling) {
  const float w = renormalize && total != 0.f ? score / total : score;
  return w * scaling;
}

// ---- moe_align_block_size bookkeeping ----------------------------------------------------------------------
// The pairs p = t * k + j are cut into chunks of consecutive pairs. The count kernel writes the per-chunk
// per-expert counts (chunk_counts[c * E + e]); the scan turns every expert's column into exclusive prefix sums
// over chunks (where chunk c's pairs of e start inside e's run); the scatter walks each chunk in warp steps of
// 32 pairs, ranking each pair among the lower lanes of its step with the same expert. Every expert's pairs so
// land in ascending p, whatever the scheduling.
constexpr int64_t kAlignChunkPairs = 1024;        // pairs per chunk while the chunk count stays small
constexpr int64_t kAlignMaxChunks = 1024;         // bounds the single-block column scan
constexpr int64_t kAlignMaxCountEntries = 1 << 22;  // bounds the (chunks, E) count workspace (16 MiB)

struct AlignChunks {
  int64_t count;  // chunks
  int64_t pairs;  // pairs per chunk (the last one may hold fewer), a multiple of 32
};

PK_HD int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

PK_HD AlignChunks align_chunks(int64_t pairs, int64_t experts) {
  if (pairs <= 0) return AlignChunks{0, kAlignChunkPairs};
  int64_t max_chunks = kAlignMaxCountEntries / experts;
  if (max_chunks > kAlignMaxChunks) max_chunks = kAlignMaxChunks;
  if (max_chunks < 1) max_chunks = 1;
  int64_t per_chunk = ceil_div64(pairs, max_chunks);
  if (per_chunk < kAlignChunkPairs) per_chunk = kAlignChunkPairs;
  per_chunk = ceil_div64(per_chunk, kMoeLanes) * kMoeLanes;
  return AlignChunks{ceil_div64(pairs, per_chunk), per_chunk};
}

// Entries of sorted_ids: every pair plus the worst-case padding of every expert, rounded up to a block.
PK_HD int64_t align_capacity(int64_t pairs, int64_t experts, int64_t block_size) {
  return ceil_div64(pairs + experts * (block_size - 1), block_size) * block_size;
}

// The id an expert's blocks carry: expert_map[e] with a map (< 0: the expert is not on this rank), else e.
PK_HD int32_t local_expert(int32_t expert, const int32_t* expert_map) {
  return expert_map != nullptr ? expert_map[expert] : expert;
}

// Entries of an expert's run in sorted_ids: its pairs padded to a multiple of block_size; 0 for an expert
// without pairs or mapped off this rank.
PK_HD int64_t expert_run(int64_t count, int32_t local, int64_t block_size) {
  if (local < 0 || count == 0) return 0;
  return ceil_div64(count, block_size) * block_size;
}

// Exclusive prefix sums over the chunks of expert e's column of chunk_counts ((chunks, experts) row-major), in
// place; returns e's pair count.
PK_HD int32_t scan_chunk_column(int32_t* chunk_counts, int64_t chunks, int experts, int expert) {
  int32_t running = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    int32_t* entry = chunk_counts + c * experts + expert;
    const int32_t count = *entry;
    *entry = running;
    running += count;
  }
  return running;
}

// The expert whose run holds sorted_ids position `position` (< the total of the runs): the last expert whose
// run starts at or before it. run_offsets (E,) are the runs' exclusive prefix sums, non-decreasing; experts
// with empty runs share their offset with the next run, so the last of equal offsets is the one that owns it.
PK_HD int expert_at(const int32_t* run_offsets, int experts, int64_t position) {
  int lo = 0, hi = experts - 1;  // run_offsets[0] = 0 <= position: the answer lies in [lo, hi]
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (run_offsets[mid] <= position) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// block_expert_ids[block]: the local id of the expert whose run holds the block, -1 past the last run.
PK_HD int32_t block_expert_id(const int32_t* run_offsets, int experts, int64_t total, int64_t block,
                              int64_t block_size, const int32_t* expert_map) {
  const int64_t position = block * block_size;
  if (position >= total) return -1;
  return local_expert(expert_at(run_offsets, experts, position), expert_map);
}

PK_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Rank of `lane` among the lanes of `same` (the lanes of a warp step holding the same expert): how many of them
// come before it, i.e. hold lower pair indices.
PK_HD int rank_in_step(uint32_t same, int lane) { return popcount32(same & ((1u << lane) - 1u)); }

// The lane that advances the expert's running position after a step: the lowest lane of `same`.
PK_HD int step_leader(uint32_t same) {
#if defined(__CUDA_ARCH__)
  return __ffs(same) - 1;
#else
  return __builtin_ctz(same);
#endif
}

}  // namespace pykernels
