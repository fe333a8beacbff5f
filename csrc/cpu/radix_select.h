// Exact magnitude top-k thresholds of N task vectors by radix select (CONTRACT: delta_topk_thresholds).
//
// For every model with k > 0 (all models share each pass over the data):
//   pass 1  histogram of the top 16 bits of mkey(d): the bucket holding rank k;
//   pass 2  histogram of the low 16 bits inside that bucket: the exact key and how many of its ties are kept.
//           While the bucket is small (the usual case) pass 2 also records its members (index, low bits), and
//           the cutoff index is read from them;
//   pass 3  only for models whose bucket was too large to record: ties at the key counted per fixed block, a
//           prefix sum over blocks, then one block scanned for the cutoff index.
// Nothing is sorted. Extra memory: per thread 4 x 128 KiB (pass 1) and 256 KiB (pass 2) of counters per model,
// int64 totals, and at most max(2^16, numel / 64) recorded members (8 bytes each) per model.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "common/merge_math.h"
#include "cpu/chunk_io.h"

namespace pykernels {
namespace cpu {

constexpr int kHighBins = 1 << 15;  // mkey < 2^31, so its top 16 bits take 2^15 values
constexpr int kLowBins = 1 << 16;

inline uint32_t mkey(float x) { return magnitude_key(x); }

// d at element i of a chunk: x - b, or x itself without a base (no subtraction, so even a signalling NaN keeps
// its bits, as in the reference).
template <bool kBase>
inline float delta_at(const float* x, const float* b, int64_t i) {
  return kBase ? x[i] - b[i] : x[i];
}

#if defined(PK_AVX512)
template <bool kBase>
inline __m512i keys16(const float* x, const float* b, int64_t i) {
  const __m512 d = kBase ? _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(b + i)) : _mm512_loadu_ps(x + i);
  return _mm512_min_epu32(_mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF)),
                          _mm512_set1_epi32(static_cast<int>(kNanKey)));
}
#endif

// State of one model's selection.
struct ModelSelect {
  int model;
  int64_t rank;       // 1-based rank (from the largest key) still to locate inside the current bucket
  uint32_t high = 0;  // top 16 bits of the threshold key (after pass 1)
  uint32_t key = 0;   // the threshold key (after pass 2)
  int64_t cutoff = -1;
};

// The bin holding 1-based rank `rank`, counting from the highest bin down; rank becomes the rank inside it.
inline uint32_t bin_of_rank(const int64_t* hist, int bins, int64_t& rank) {
  int64_t above = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (above + hist[b] >= rank) {
      rank -= above;
      return static_cast<uint32_t>(b);
    }
    above += hist[b];
  }
  TORCH_CHECK(false, "pykernels: radix select lost rank ", rank, " (internal error)");
  return 0;
}

// Calls fn(s, start, len, x, b) for every chunk of blocks [first, end) and every selected model s, with x the
// model's float32 values and b the base's (nullptr without a base).
template <typename Fn>
void for_model_chunks(const DeltaInputs& in, const std::vector<ModelSelect>& sel, int64_t first, int64_t end,
                      const Fn& fn) {
  ChunkBuffers buf(2);
  for (int64_t block = first; block < end; ++block) {
    for_chunks_of_block(in.numel, block, [&](int64_t start, int64_t len) {
      const float* b = in.load_base(start, len, buf[0]);
      for (size_t s = 0; s < sel.size(); ++s) fn(s, start, len, in.models[sel[s].model].load(start, len, buf[1]), b);
    });
  }
}

// ------------------------------------------------------------------------------------------------------------
// Pass 1

// ++hist[c][mkey(d[i]) >> 16] with c = i % kCopies. Task vectors hold long runs of similar magnitudes, and
// increments of one counter in a row serialise on store-to-load forwarding: separate copies break the chain.
// The bins are computed first in a loop that vectorises.
template <bool kBase, int kCopies>
void count_high(const float* __restrict x, const float* __restrict b, int64_t len, uint32_t* __restrict bins,
                uint32_t* __restrict hist) {
  int64_t i = 0;
#if defined(PK_AVX512)
  for (; i + 16 <= len; i += 16) _mm512_storeu_si512(bins + i, _mm512_srli_epi32(keys16<kBase>(x, b, i), 16));
#endif
  for (; i < len; ++i) bins[i] = mkey(delta_at<kBase>(x, b, i)) >> 16;
  i = 0;
  for (; i + kCopies <= len; i += kCopies) {
    for (int c = 0; c < kCopies; ++c) ++hist[c * kHighBins + bins[i + c]];
  }
  for (; i < len; ++i) ++hist[bins[i]];
}

// int64 histograms of mkey >> 16 into total (sel.size() x kHighBins, zeroed by the caller).
inline void high_histograms(const DeltaInputs& in, const std::vector<ModelSelect>& sel, int64_t* total) {
  // Copies cost zeroing and merging 4 x 128 KiB per model and thread: worth it for larger tensors only.
  const int copies = in.numel >= (int64_t(1) << 17) ? 4 : 1;
  const size_t per_model = static_cast<size_t>(copies) * kHighBins;
  std::mutex lock;
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    const ThreadScratch scratch(kCountSlot, sel.size() * per_model * sizeof(uint32_t) + kChunk * sizeof(uint32_t));
    uint32_t* local = scratch.zeroed<uint32_t>(sel.size() * per_model);  // per call < 2^32 elements: no overflow
    uint32_t* bins = local + sel.size() * per_model;
    for_model_chunks(in, sel, first, end, [&](size_t s, int64_t, int64_t len, const float* x, const float* b) {
      with_bool(b != nullptr, [&](auto has_base) {
        if (copies == 4) {
          count_high<decltype(has_base)::value, 4>(x, b, len, bins, local + s * per_model);
        } else {
          count_high<decltype(has_base)::value, 1>(x, b, len, bins, local + s * per_model);
        }
      });
    });
    std::lock_guard<std::mutex> guard(lock);
    for (size_t s = 0; s < sel.size(); ++s) {
      for (int c = 0; c < copies; ++c) {
        const uint32_t* h = local + s * per_model + c * kHighBins;
        int64_t* t = total + s * kHighBins;
        for (int bin = 0; bin < kHighBins; ++bin) t[bin] += h[bin];
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Pass 2

// Members of one model's bucket: (index << 16) | low 16 bits, up to `cap` of them.
struct MemberList {
  std::vector<uint64_t> items;
  size_t cap = 0;
  bool overflow = false;

  // The n members of the chunk at `start`: chunk-relative indices and keys.
  void add(int64_t start, const uint32_t* index, const uint32_t* key, int64_t n) {
    if (overflow || items.size() + n > cap) {
      overflow = true;
      return;
    }
    for (int64_t h = 0; h < n; ++h) {
      items.push_back((static_cast<uint64_t>(start + index[h]) << 16) | (key[h] & 0xFFFFu));
    }
  }
};

// The elements of a chunk whose key lies in bucket `high`, compacted: chunk-relative index and key. `index` and
// `key` hold kChunk + 16 entries. Returns how many.
template <bool kBase>
int64_t bucket_hits(const float* __restrict x, const float* __restrict b, int64_t len, uint32_t high,
                    uint32_t* __restrict index, uint32_t* __restrict key) {
  int64_t n = 0, i = 0;
#if defined(PK_AVX512)
  // Branch-free: compress the matching lanes of every 16 (register-form vpcompressd; the memory form is slow on
  // Zen 4) and store all 16 lanes, the ones past the hits being overwritten next.
  const __m512i bucket = _mm512_set1_epi32(static_cast<int32_t>(high));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= len; i += 16) {
    const __m512i k = keys16<kBase>(x, b, i);
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(k, 16), bucket);
    _mm512_storeu_si512(key + n, _mm512_maskz_compress_epi32(hit, k));
    const __m512i positions = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i)), iota);
    _mm512_storeu_si512(index + n, _mm512_maskz_compress_epi32(hit, positions));
    n += _mm_popcnt_u32(_cvtmask16_u32(hit));
  }
#endif
  for (; i < len; ++i) {
    const uint32_t k = mkey(delta_at<kBase>(x, b, i));
    index[n] = static_cast<uint32_t>(i);
    key[n] = k;
    n += (k >> 16) == high;
  }
  return n;
}

// Pass 2 for one chunk of one model: ++count[low 16 bits] of the bucket's elements, recorded as members.
template <bool kBase>
void count_low(const float* x, const float* b, int64_t start, int64_t len, uint32_t high, uint32_t* hit_index,
               uint32_t* hit_key, uint32_t* __restrict count, MemberList& members) {
  const int64_t n = bucket_hits<kBase>(x, b, len, high, hit_index, hit_key);
  for (int64_t h = 0; h < n; ++h) ++count[hit_key[h] & 0xFFFFu];
  members.add(start, hit_index, hit_key, n);
}

// Pass 2 results besides the counts: each model's bucket members, as the lists of the parallel calls keyed by
// their first block (each list is in ascending index order), complete unless the bucket was too large.
struct BucketMembers {
  std::vector<std::vector<std::pair<int64_t, std::vector<uint64_t>>>> lists;  // [model][call]
  std::vector<bool> complete;
};

// int64 counts of the low 16 bits inside each model's bucket into total (sel.size() x kLowBins, zeroed).
inline BucketMembers low_histograms(const DeltaInputs& in, const std::vector<ModelSelect>& sel, int64_t* total) {
  const size_t models = sel.size();
  const size_t bins = models * kLowBins;
  // Members are kept while a bucket holds at most 1/64 of the elements (8 bytes each): a typical bucket holds
  // well under 1%; heavily tied low-precision data may not, and then pass 3 reads the data again instead.
  const size_t cap = static_cast<size_t>(std::max<int64_t>(int64_t(1) << 16, in.numel / 64));
  BucketMembers result{std::vector<std::vector<std::pair<int64_t, std::vector<uint64_t>>>>(models),
                       std::vector<bool>(models, true)};
  std::vector<size_t> held(models, 0);
  std::mutex lock;
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    const ThreadScratch scratch(kCountSlot, (bins + 2 * (kChunk + 16)) * sizeof(uint32_t));
    uint32_t* count = scratch.zeroed<uint32_t>(bins);  // per call < 2^32 elements: no overflow
    uint32_t* hit_index = count + bins;
    uint32_t* hit_key = hit_index + kChunk + 16;
    std::vector<MemberList> members(models);
    for (MemberList& m : members) m.cap = cap;
    for_model_chunks(in, sel, first, end, [&](size_t s, int64_t start, int64_t len, const float* x, const float* b) {
      with_bool(b != nullptr, [&](auto has_base) {
        count_low<decltype(has_base)::value>(x, b, start, len, sel[s].high, hit_index, hit_key, count + s * kLowBins,
                                             members[s]);
      });
    });
    std::lock_guard<std::mutex> guard(lock);
    for (size_t i = 0; i < bins; ++i) total[i] += count[i];
    for (size_t s = 0; s < models; ++s) {
      held[s] += members[s].items.size();
      if (members[s].overflow || held[s] > cap) result.complete[s] = false;
      if (result.complete[s]) result.lists[s].emplace_back(first, std::move(members[s].items));
    }
  });
  return result;
}

// The index of the rank-th (1-based, in index order) bucket member whose low 16 bits are `low`.
inline int64_t cut_from_members(std::vector<std::pair<int64_t, std::vector<uint64_t>>>& lists, uint32_t low,
                                int64_t rank) {
  std::sort(lists.begin(), lists.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& list : lists) {
    for (const uint64_t item : list.second) {
      if ((item & 0xFFFFu) == low && --rank == 0) return static_cast<int64_t>(item >> 16);
    }
  }
  TORCH_CHECK(false, "pykernels: radix select lost a tie (internal error)");
  return -1;
}

// ------------------------------------------------------------------------------------------------------------
// Pass 3

// Number of elements of a chunk whose key is `key`.
template <bool kBase>
int64_t count_key(const float* __restrict x, const float* __restrict b, int64_t len, uint32_t key) {
  int64_t n = 0;
  for (int64_t i = 0; i < len; ++i) n += mkey(delta_at<kBase>(x, b, i)) == key;
  return n;
}

// Index in the chunk of its rank-th element with key `key` (rank decremented by the ones passed), or -1.
template <bool kBase>
int64_t find_key(const float* x, const float* b, int64_t len, uint32_t key, int64_t& rank) {
  for (int64_t i = 0; i < len; ++i) {
    if (mkey(delta_at<kBase>(x, b, i)) == key && --rank == 0) return i;
  }
  return -1;
}

// For each model of `cut`: cutoff = the index of its rank-th element (ascending index) with mkey == key.
inline void locate_cut_ties(const DeltaInputs& in, std::vector<ModelSelect>& cut) {
  const int64_t blocks = (in.numel + kBlock - 1) / kBlock;
  const size_t models = cut.size();
  std::vector<int64_t> ties(static_cast<size_t>(blocks) * models, 0);  // [block][model]
  parallel_blocks(in.numel, [&](int64_t first, int64_t end) {
    for_model_chunks(in, cut, first, end, [&](size_t s, int64_t start, int64_t len, const float* x, const float* b) {
      with_bool(b != nullptr, [&](auto has_base) {
        ties[(start / kBlock) * models + s] += count_key<decltype(has_base)::value>(x, b, len, cut[s].key);
      });
    });
  });
  ChunkBuffers buf(2);
  for (size_t s = 0; s < models; ++s) {
    ModelSelect& m = cut[s];
    int64_t block = 0;
    while (m.rank > ties[block * models + s]) m.rank -= ties[block++ * models + s];
    for_chunks_of_block(in.numel, block, [&](int64_t start, int64_t len) {
      if (m.cutoff >= 0) return;
      const float* b = in.load_base(start, len, buf[0]);
      const float* x = in.models[m.model].load(start, len, buf[1]);
      with_bool(b != nullptr, [&](auto has_base) {
        const int64_t i = find_key<decltype(has_base)::value>(x, b, len, m.key, m.rank);
        if (i >= 0) m.cutoff = start + i;
      });
    });
  }
}

// ------------------------------------------------------------------------------------------------------------

// int64 (N, 2) of (key, cutoff) per model (see CONTRACT / reference.selection.delta_topk_thresholds).
inline at::Tensor topk_thresholds(const DeltaInputs& in, const std::vector<int64_t>& ks) {
  at::Tensor out = at::empty({in.n(), 2}, at::kLong);
  auto rows = out.accessor<int64_t, 2>();
  std::vector<ModelSelect> sel;
  for (int m = 0; m < in.n(); ++m) {
    rows[m][0] = kKeepNone;
    rows[m][1] = -1;
    if (ks[m] > 0) sel.push_back(ModelSelect{m, ks[m]});
  }
  if (sel.empty()) return out;

  {
    const ThreadScratch scratch(kTotalSlot, sel.size() * kHighBins * sizeof(int64_t));
    int64_t* high = scratch.zeroed<int64_t>(sel.size() * kHighBins);
    high_histograms(in, sel, high);
    for (size_t s = 0; s < sel.size(); ++s) sel[s].high = bin_of_rank(high + s * kHighBins, kHighBins, sel[s].rank);
  }

  std::vector<ModelSelect> cut;  // models whose cutoff needs pass 3
  {
    const ThreadScratch scratch(kTotalSlot, sel.size() * kLowBins * sizeof(int64_t));
    int64_t* low = scratch.zeroed<int64_t>(sel.size() * kLowBins);
    BucketMembers members = low_histograms(in, sel, low);
    for (size_t s = 0; s < sel.size(); ++s) {
      const uint32_t bin = bin_of_rank(low + s * kLowBins, kLowBins, sel[s].rank);
      sel[s].key = (sel[s].high << 16) | bin;
      if (members.complete[s]) {
        sel[s].cutoff = cut_from_members(members.lists[s], bin, sel[s].rank);
      } else {
        cut.push_back(sel[s]);
      }
    }
  }
  if (!cut.empty()) locate_cut_ties(in, cut);

  for (const ModelSelect& s : sel) {
    rows[s.model][0] = s.key;
    rows[s.model][1] = s.cutoff;
  }
  for (const ModelSelect& s : cut) rows[s.model][1] = s.cutoff;
  return out;
}

}  // namespace cpu
}  // namespace pykernels
