"""Host tests of the CUDA backend's device logic (no GPU needed).

The CUDA kernels (csrc/cuda/merging.cu) keep their per-element and bookkeeping logic in PK_HD functions of
csrc/common/fused_element.h and csrc/common/radix.h. A small harness compiled here with g++ (ctypes, no torch
headers) runs exactly those functions, in the order the kernels use them, and the results are compared with
pykernels.reference:
  * dtype loads / round-to-nearest-even stores vs torch casts,
  * Philox vs the reference,
  * delta_topk_thresholds: the three radix passes (top-16-bit histogram, block-parallel bucket search, refine
    histogram with the largest index per bin, per-chunk tie counts, in-chunk tie scan), bit-exact,
  * fused_merge: fused_merge_element() + store, bit-exact (the harness is compiled with -ffp-contract=off, the
    kernels need nvcc -fmad=false for the same guarantee),
  * delta_l1_norms: keep_element() + |d| sums,
  * the sparsifier masks of keep_element() (magnitude threshold, random, band) element by element.
Device-only parts (warp ballots, atomics, cub scans) are not exercised here; tools/check_cuda.sh compiles them.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pykernels.reference import merging as ref_merging
from pykernels.reference import selection as ref_selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KEEP_NONE = 1 << 32

HARNESS = r"""
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/fused_element.h"
#include "common/radix.h"

using namespace pykernels;

namespace {

DeltaInputs make_inputs(int n, int64_t numel, const void* base, int base_dtype, const void* const* data,
                        const int* dtypes) {
  DeltaInputs in{};
  in.n = n;
  in.numel = numel;
  in.base = base;
  in.base_dtype = base_dtype;
  for (int m = 0; m < n; ++m) {
    in.data[m] = data[m];
    in.dtype[m] = dtypes[m];
  }
  return in;
}

uint32_t key_at(const DeltaInputs& in, int m, int64_t j) {  // as the kernels' key_at
  return magnitude_key(load_delta(in, m, j, load_base(in, j)));
}

// block_find_rank of merging.cu with `threads` threads run one after the other; -2 if not exactly one
// thread claims the rank.
int64_t block_find_rank(const std::vector<uint64_t>& counts, uint64_t rank, bool descending, int threads,
                        uint64_t* remaining) {
  const int64_t n = static_cast<int64_t>(counts.size());
  std::vector<uint64_t> total(threads, 0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t pos = segment_begin(t, n, threads); pos < segment_end(t, n, threads); ++pos) {
      total[t] += counts[scan_bin(pos, n, descending)];
    }
  }
  uint64_t prefix = 0;
  int claims = 0;
  int64_t found = -1;
  for (int t = 0; t < threads; ++t) {
    if (segment_holds_rank(prefix, total[t], rank)) {
      ++claims;
      found = find_rank(counts.data(), n, segment_begin(t, n, threads), segment_end(t, n, threads), rank - prefix,
                        descending, remaining);
    }
    prefix += total[t];
  }
  return claims == 1 ? found : -2;
}

}  // namespace

extern "C" {

int pk_topk(int n, int64_t numel, const void* base, int base_dtype, const void* const* data, const int* dtypes,
            const int64_t* ks, int threads, int64_t tie_chunk, int64_t* out, int* used_tie_pass) {
  const DeltaInputs in = make_inputs(n, numel, base, base_dtype, data, dtypes);
  for (int m = 0; m < n; ++m) {
    used_tie_pass[m] = 0;
    const uint64_t k = static_cast<uint64_t>(ks[m]);
    if (k == 0) {
      out[2 * m] = kKeepNone;
      out[2 * m + 1] = -1;
      continue;
    }
    // pass 1: top digit, counted on the histogram owner's data (a repeated buffer is counted once)
    const int owner = histogram_owner(in, ks, m);
    if (owner != m && (owner > m || ks[owner] == 0)) return -5;
    std::vector<uint64_t> hist_hi(kRadixHiBins, 0);
    for (int64_t j = 0; j < numel; ++j) ++hist_hi[radix_hi(key_at(in, owner, j))];
    uint64_t r1 = 0;
    const int64_t bucket = block_find_rank(hist_hi, k, true, threads, &r1);
    if (bucket < 0) return -1;
    // pass 2: low digit inside the bucket, largest index per low bin
    std::vector<uint64_t> hist_lo(kRadixLoBins, 0), last_lo(kRadixLoBins, 0);
    for (int64_t j = 0; j < numel; ++j) {
      const uint32_t key = key_at(in, m, j);
      if (radix_hi(key) != static_cast<uint32_t>(bucket)) continue;
      ++hist_lo[radix_lo(key)];
      last_lo[radix_lo(key)] = std::max<uint64_t>(last_lo[radix_lo(key)], static_cast<uint64_t>(j));
    }
    uint64_t r2 = 0;
    const int64_t lo = block_find_rank(hist_lo, r1, true, threads, &r2);
    if (lo < 0) return -2;
    const uint32_t key = radix_join(static_cast<uint32_t>(bucket), static_cast<uint32_t>(lo));
    out[2 * m] = key;
    if (all_ties_kept(r2, hist_lo[lo])) {
      out[2 * m + 1] = static_cast<int64_t>(last_lo[lo]);
      continue;
    }
    // pass 3: ties per chunk, then the r3-th tie of the chunk scanned in tiles of `threads`
    used_tie_pass[m] = 1;
    const int64_t nchunks = (numel + tie_chunk - 1) / tie_chunk;
    std::vector<uint64_t> ties(nchunks, 0);
    for (int64_t j = 0; j < numel; ++j) ties[j / tie_chunk] += key_at(in, m, j) == key;
    uint64_t r3 = 0;
    const int64_t chunk = block_find_rank(ties, r2, false, threads, &r3);
    if (chunk < 0) return -3;
    const int64_t begin = chunk * tie_chunk, end = std::min(begin + tie_chunk, numel);
    int64_t cutoff = -1;
    uint64_t before = 0;
    for (int64_t t0 = begin; t0 < end && before < r3; t0 += threads) {
      uint64_t inclusive = 0;
      for (int t = 0; t < threads; ++t) {
        const int64_t j = t0 + t;
        const bool tie = j < end && key_at(in, m, j) == key;
        inclusive += tie;
        if (tie && before + inclusive == r3) cutoff = j;
      }
      before += inclusive;
    }
    if (cutoff < 0) return -4;
    out[2 * m + 1] = cutoff;
  }
  return 0;
}

void pk_fused_merge(int n, int64_t numel, const void* base, int base_dtype, const void* const* data,
                    const int* dtypes, int sparsifier, const int64_t* thresholds, const double* keep_probs,
                    int64_t seed, const float* scales, const double* weights, int sign_source, int consensus,
                    int divisor, int normalize, double lambda, void* out, int out_dtype) {
  const DeltaInputs in = make_inputs(n, numel, base, base_dtype, data, dtypes);
  const SparsifyArgs sparsify = make_sparsify_args(sparsifier, thresholds, keep_probs, seed, n);
  MergeSettings settings{};  // as bindings.cpp fills it
  settings.scales = scales;
  for (int m = 0; m < n; ++m) settings.weights[m] = static_cast<float>(weights[m]);
  settings.sign_source = sign_source;
  settings.consensus = consensus;
  settings.divisor = divisor;
  settings.normalize = normalize != 0;
  settings.lambda = static_cast<float>(lambda);
  const MergeParams p = merge_params_of(settings, in.n, in.base != nullptr);  // as fused_merge_kernel
  for (int64_t j = 0; j < numel; ++j) store_from_float(out, out_dtype, j, fused_merge_element(in, sparsify, p, j));
}

void pk_l1_norms(int n, int64_t numel, const void* base, int base_dtype, const void* const* data, const int* dtypes,
                 int sparsifier, const int64_t* thresholds, const double* keep_probs, int64_t seed, int64_t chunk,
                 double* out) {
  const DeltaInputs in = make_inputs(n, numel, base, base_dtype, data, dtypes);
  const SparsifyArgs sparsify = make_sparsify_args(sparsifier, thresholds, keep_probs, seed, n);
  for (int m = 0; m < n; ++m) {
    double all = 0.0, kept = 0.0;
    for (int64_t begin = 0; begin < numel; begin += chunk) {  // fixed-size chunk partials, summed in order
      double chunk_all = 0.0, chunk_kept = 0.0;
      for (int64_t j = begin; j < std::min(begin + chunk, numel); ++j) {
        const float d = load_delta(in, m, j, load_base(in, j));
        const double magnitude = d < 0 ? -static_cast<double>(d) : static_cast<double>(d);
        chunk_all += magnitude;
        if (keep_element(sparsify, m, d, j)) chunk_kept += magnitude;
      }
      all += chunk_all;
      kept += chunk_kept;
    }
    out[2 * m] = all;
    out[2 * m + 1] = kept;
  }
}

// keep_element() of every model at every element (out: n x numel bytes), as the kernels evaluate it.
void pk_keep_mask(int n, int64_t numel, const void* base, int base_dtype, const void* const* data, const int* dtypes,
                  int sparsifier, const int64_t* thresholds, const double* keep_probs, int64_t seed, uint8_t* out) {
  const DeltaInputs in = make_inputs(n, numel, base, base_dtype, data, dtypes);
  const SparsifyArgs sparsify = make_sparsify_args(sparsifier, thresholds, keep_probs, seed, n);
  for (int m = 0; m < n; ++m) {
    for (int64_t j = 0; j < numel; ++j) {
      out[m * numel + j] = keep_element(sparsify, m, load_delta(in, m, j, load_base(in, j)), j) ? 1 : 0;
    }
  }
}

int pk_threshold_columns(int sparsifier) { return threshold_columns(sparsifier); }

void pk_histogram_owners(int n, int64_t numel, const void* base, int base_dtype, const void* const* data,
                         const int* dtypes, const int64_t* ks, int* out) {
  const DeltaInputs in = make_inputs(n, numel, base, base_dtype, data, dtypes);
  for (int m = 0; m < n; ++m) out[m] = histogram_owner(in, ks, m);
}

void pk_philox(uint64_t seed, int64_t offset, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = philox_uniform(seed, offset + i);
}

void pk_load(const void* src, int dtype, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = load_as_float(src, dtype, j);
}

void pk_store(const float* src, int dtype, int64_t n, void* out) {
  for (int64_t j = 0; j < n; ++j) store_from_float(out, dtype, j, src[j]);
}

int pk_find_rank(const uint64_t* counts, int64_t n, uint64_t rank, int descending, int threads,
                 uint64_t* remaining) {
  return static_cast<int>(
      block_find_rank(std::vector<uint64_t>(counts, counts + n), rank, descending != 0, threads, remaining));
}

}  // extern "C"
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the host harness")
    tmp = tmp_path_factory.mktemp("cuda_host_logic")
    src, so = tmp / "harness.cpp", tmp / "harness.so"
    src.write_text(HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-shared", "-fPIC",
           "-I", CSRC, str(src), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"harness build failed:\n{' '.join(cmd)}\n{done.stderr}"
    h = ctypes.CDLL(str(so))
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    h.pk_topk.argtypes = [i32, i64, p, i32, p, p, p, i32, i64, p, p]
    h.pk_topk.restype = i32
    h.pk_fused_merge.argtypes = [i32, i64, p, i32, p, p, i32, p, p, i64, p, p, i32, i32, i32, i32, f64, p, i32]
    h.pk_fused_merge.restype = None
    h.pk_l1_norms.argtypes = [i32, i64, p, i32, p, p, i32, p, p, i64, i64, p]
    h.pk_l1_norms.restype = None
    h.pk_keep_mask.argtypes = [i32, i64, p, i32, p, p, i32, p, p, i64, p]
    h.pk_keep_mask.restype = None
    h.pk_threshold_columns.argtypes = [i32]
    h.pk_threshold_columns.restype = i32
    h.pk_histogram_owners.argtypes = [i32, i64, p, i32, p, p, p, p]
    h.pk_histogram_owners.restype = None
    h.pk_philox.argtypes = [ctypes.c_uint64, i64, i64, p]
    h.pk_philox.restype = None
    h.pk_load.argtypes = [p, i32, i64, p]
    h.pk_store.argtypes = [p, i32, i64, p]
    h.pk_find_rank.argtypes = [p, i64, ctypes.c_uint64, i32, i32, p]
    h.pk_find_rank.restype = i32
    return h


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class _Inputs:
    """Raw arguments for the harness (contiguous tensors kept alive)."""

    def __init__(self, base, tensors):
        self.tensors = [t.contiguous() for t in tensors]
        self.base = None if base is None else base.contiguous()
        n = len(tensors)
        self.n = n
        self.numel = tensors[0].numel()
        self.data = (ctypes.c_void_p * n)(*[t.data_ptr() for t in self.tensors])
        self.dtypes = (ctypes.c_int * n)(*[DTYPE_CODES[t.dtype] for t in self.tensors])
        self.base_ptr = _ptr(self.base)
        self.base_dtype = DTYPE_CODES[base.dtype] if base is not None else 0

    def head(self):
        return [self.n, self.numel, self.base_ptr, self.base_dtype, self.data, self.dtypes]


def host_topk(lib, base, tensors, ks, threads=1024, tie_chunk=16384):
    inp = _Inputs(base, tensors)
    ks_t = torch.tensor(ks, dtype=torch.int64)
    out = torch.empty(len(tensors), 2, dtype=torch.int64)
    used = torch.zeros(len(tensors), dtype=torch.int32)
    rc = lib.pk_topk(*inp.head(), _ptr(ks_t), threads, tie_chunk, _ptr(out), _ptr(used))
    assert rc == 0, f"harness failed with {rc}"
    return out, used


def _random_tensors(gen, n, shape, dtypes, base_dtype, pattern):
    def make(dtype):
        if pattern == "gauss":
            x = torch.randn(shape, generator=gen)
        elif pattern == "ties":  # few distinct magnitudes, many exact ties (also of d)
            x = torch.randint(-3, 4, shape, generator=gen).float() * 0.25
        elif pattern == "zeros":
            x = torch.zeros(shape)
        else:  # "special": ties + huge/tiny values + non-finite entries
            x = torch.randint(-2, 3, shape, generator=gen).float()
            flat = x.view(-1)
            idx = torch.randperm(flat.numel(), generator=gen)
            specials = [float("nan"), float("inf"), -float("inf"), 1e-40, -3e38, 65504.0, -0.0]
            for s, i in zip(specials, idx[: len(specials)].tolist()):
                flat[i] = s
        return x.to(dtype)

    tensors = [make(dtypes[i % len(dtypes)]) for i in range(n)]
    base = None if base_dtype is None else make(base_dtype)
    return base, tensors


# ---------------------------------------------------------------------------------------------------------
def test_load_matches_torch_exhaustive(lib):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        src = bits.view(dtype).contiguous()
        out = torch.empty(src.numel(), dtype=torch.float32)
        lib.pk_load(_ptr(src), DTYPE_CODES[dtype], src.numel(), _ptr(out))
        expect = src.float()
        nan = expect.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int32), expect[~nan].view(torch.int32)), dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_rounds_like_torch(lib, dtype):
    gen = torch.Generator().manual_seed(1)
    # every value halfway between (and next to) two neighbouring 16-bit values, plus random bit patterns
    all16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    all16 = all16[all16.isfinite()].unique()
    mid = (all16[:-1].double() + all16[1:].double()) / 2
    near = torch.cat([mid.float(), torch.nextafter(mid.float(), torch.tensor(float("inf"))),
                      torch.nextafter(mid.float(), torch.tensor(-float("inf")))])
    rand_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                             2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-14, 3.4e38, 1e-45])
    src = torch.cat([near, rand_bits.view(torch.float32), specials, all16]).contiguous()
    out = torch.empty(src.numel(), dtype=dtype)
    lib.pk_store(_ptr(src), DTYPE_CODES[dtype], src.numel(), _ptr(out))
    expect = src.to(dtype)
    nan = expect.isnan()
    assert torch.equal(out.isnan(), nan)
    bad = (out[~nan].view(torch.int16) != expect[~nan].view(torch.int16)).nonzero()
    assert bad.numel() == 0, f"first mismatches at {src[~nan][bad[:5, 0]].tolist()}"


def test_store_float32_is_identity(lib):
    src = torch.randn(1000)
    out = torch.empty_like(src)
    lib.pk_store(_ptr(src), 0, src.numel(), _ptr(out))
    assert torch.equal(out, src)


def test_philox_matches_reference(lib):
    for seed, offset in [(0, 0), (42, 123), ((1 << 63) - 5, (1 << 32) - 100), (ref_merging.model_seed(7, 3), 1 << 40)]:
        n = 4096
        out = torch.empty(n, dtype=torch.float32)
        lib.pk_philox(seed, offset, n, _ptr(out))
        expect = ref_merging.philox_uniform(seed, torch.arange(offset, offset + n, dtype=torch.int64))
        assert torch.equal(out.view(torch.int32), expect.view(torch.int32)), (seed, offset)


@pytest.mark.parametrize("threads", [1, 7, 1024])
def test_block_find_rank(lib, threads):
    gen = torch.Generator().manual_seed(threads)
    for n in (1, 5, 1000, 32768):
        counts = torch.randint(0, 4, (n,), generator=gen, dtype=torch.int64) * torch.randint(
            0, 2, (n,), generator=gen, dtype=torch.int64)
        counts[n // 2] += 1  # at least one element
        total = int(counts.sum())
        for descending in (True, False):
            order = counts.flip(0) if descending else counts
            cumulative = order.cumsum(0)
            for rank in sorted({1, total, (total + 1) // 2, max(1, total // 3)}):
                remaining = ctypes.c_uint64()
                got = lib.pk_find_rank(_ptr(counts), n, rank, int(descending), threads, ctypes.byref(remaining))
                pos = int(torch.searchsorted(cumulative, rank))  # first position whose cumulative >= rank
                expect_bin = n - 1 - pos if descending else pos
                before = int(cumulative[pos - 1]) if pos > 0 else 0
                assert (got, remaining.value) == (expect_bin, rank - before), (n, descending, rank)
        over = ctypes.c_uint64()
        assert lib.pk_find_rank(_ptr(counts), n, total + 1, 1, threads, ctypes.byref(over)) < 0


CASES = [
    # n, shape, dtypes, base dtype, pattern
    (1, (1,), [torch.float32], None, "gauss"),
    (1, (17,), [torch.float32], torch.float32, "ties"),
    (3, (40, 50), [torch.float32, torch.bfloat16, torch.float16], torch.bfloat16, "gauss"),
    (2, (3000,), [torch.bfloat16], torch.float32, "ties"),
    (2, (257, 3), [torch.float16, torch.float32], None, "special"),
    (2, (500,), [torch.float32], torch.float32, "zeros"),
    (4, (4096,), [torch.float16], torch.float16, "special"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("threads,tie_chunk", [(1024, 16384), (7, 64), (32, 1)])
def test_topk_thresholds_match_reference(lib, case, threads, tie_chunk):
    n, shape, dtypes, base_dtype, pattern = CASES[case]
    gen = torch.Generator().manual_seed(case * 101 + threads)
    base, tensors = _random_tensors(gen, n, shape, dtypes, base_dtype, pattern)
    numel = tensors[0].numel()
    candidates = sorted({0, 1, numel, numel // 2, max(numel - 1, 0), numel // 7, numel // 3 + 1})
    for k0 in candidates:
        ks = [min(numel, (k0 + 13 * m) % (numel + 1)) for m in range(n)]
        got, _ = host_topk(lib, base, tensors, ks, threads, tie_chunk)
        expect = ref_selection.delta_topk_thresholds(base, tensors, ks)
        assert torch.equal(got, expect), (ks, got.tolist(), expect.tolist())


def test_topk_tie_pass_is_exercised_and_exact(lib):
    # heavy ties straddling the k-th key across several chunks: the tie pass must run and pick the cutoff
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (10_000,), generator=gen).float()
    above, ties = int((x == 2).sum()), int((x == 1).sum())
    # one tie, a middle one, all but one (the boundary of the "all ties kept" shortcut), all but one of the
    # smallest key (k = numel - 1), the first element
    ks = [above + 1, above + 1234, above + ties - 1, 10_000 - 1, 1]
    xs = [x] * len(ks)
    for threads, tie_chunk in [(64, 256), (1024, 16384), (3, 1)]:
        got, used = host_topk(lib, None, xs, ks, threads=threads, tie_chunk=tie_chunk)
        assert used.tolist() == [1] * len(ks)
        assert torch.equal(got, ref_selection.delta_topk_thresholds(None, xs, ks))
    # all ties at the k-th key kept: no tie pass, the cutoff is the largest index with that key
    k_all = int((x == 2).sum())
    got, used = host_topk(lib, None, [x], [k_all])
    assert used.tolist() == [0]
    assert torch.equal(got, ref_selection.delta_topk_thresholds(None, [x], [k_all]))


def test_topk_repeated_buffers(lib):
    """The band's 2N thresholds in one call: a buffer listed again is served by the pass-1 histogram of its first
    listing with k > 0 (histogram_owner), and every row is still its own exact top-k."""
    gen = torch.Generator().manual_seed(8)
    base, (a, b) = _random_tensors(gen, 2, (3000,), [torch.bfloat16, torch.float32], torch.bfloat16, "ties")
    listed = [a, b, a, b, a, a.float()]  # a.float(): another buffer (and dtype), its own histogram
    cases = {(0, 700, 1500, 0, 2999, 10): [0, 1, 2, 1, 2, 5], (1200, 0, 1, 3000, 0, 1200): [0, 1, 0, 3, 0, 5],
             (0,) * 6: [0, 1, 2, 3, 4, 5]}
    for ks, owners in cases.items():
        got, _ = host_topk(lib, base, listed, list(ks), threads=64, tie_chunk=256)
        assert torch.equal(got, ref_selection.delta_topk_thresholds(base, listed, list(ks))), ks
        inp = _Inputs(base, listed)
        ks_t = torch.tensor(ks, dtype=torch.int64)
        out = (ctypes.c_int * len(listed))()
        lib.pk_histogram_owners(*inp.head(), _ptr(ks_t), out)
        assert list(out) == owners, ks


def test_topk_empty(lib):
    x = torch.empty(0)
    got, _ = host_topk(lib, x, [x, x], [0, 0])
    assert got.tolist() == [[KEEP_NONE, -1], [KEEP_NONE, -1]]


def _thresholds(base, tensors, density):
    numel = tensors[0].numel()
    ks = [int(density * numel) for _ in tensors]
    return ref_selection.delta_topk_thresholds(base, tensors, ks)


BAND_SETTINGS = [(0.3, 0.05), (0.5, 0.0), (1.0, 0.01), (0.2, 1.0), (0.0, 0.1), (0.6, 0.3)]


def _band_thresholds(base, tensors):
    """(N, 4) band thresholds (breadcrumbs) of mergekit's formula for a spread of (density, gamma)."""
    n, numel = len(tensors), tensors[0].numel()
    pairs = [ref_merging.band_counts(*BAND_SETTINGS[m % len(BAND_SETTINGS)], numel) for m in range(n)]
    a = ref_selection.delta_topk_thresholds(base, tensors, [p[0] for p in pairs])
    b = ref_selection.delta_topk_thresholds(base, tensors, [p[1] for p in pairs])
    return torch.cat([a, b], dim=1)


def _thresholds_for(sparsifier, base, tensors, density):
    if sparsifier == 1:
        return _thresholds(base, tensors, density)
    if sparsifier == 3:
        return _band_thresholds(base, tensors)
    return torch.zeros(len(tensors), 2, dtype=torch.int64)


MERGE_CASES = [
    # sparsifier, sign_source, consensus, divisor, normalize, lambda
    (0, 0, 0, 0, False, 1.0),  # task arithmetic
    (0, 0, 0, 0, True, 1.0),   # linear
    (0, 0, 0, 1, True, 0.5),
    (1, 0, 1, 0, True, 1.0),   # ties
    (1, 1, 1, 1, True, 1.0),   # peft ties ("total", disjoint count)
    (1, 1, 2, 1, True, 0.7),   # peft "frequency"
    (2, 0, 1, 0, False, 1.0),  # dare_ties
    (2, 0, 0, 0, False, 1.3),  # dare_linear
    (2, 1, 2, 0, True, 1.0),
    (3, 0, 0, 0, False, 1.0),  # breadcrumbs
    (3, 0, 1, 0, False, 1.0),  # breadcrumbs_ties
    (3, 1, 2, 1, True, 0.6),
]


@pytest.mark.parametrize("mcase", range(len(MERGE_CASES)))
@pytest.mark.parametrize("dcase", [0, 1, 2])
def test_fused_merge_matches_reference(lib, mcase, dcase):
    sparsifier, sign_source, consensus, divisor, normalize, lambda_ = MERGE_CASES[mcase]
    n, shape, dtypes, base_dtype, pattern = [
        (3, (33, 31), [torch.float32], torch.float32, "gauss"),
        (2, (1000,), [torch.bfloat16, torch.float16], torch.bfloat16, "special"),
        (4, (777,), [torch.float16, torch.float32], None, "ties"),
    ][dcase]
    gen = torch.Generator().manual_seed(mcase * 10 + dcase)
    base, tensors = _random_tensors(gen, n, shape, dtypes, base_dtype, pattern)
    thresholds = _thresholds_for(sparsifier, base, tensors, 0.3)
    keep_probs = [0.3, 1.0, 0.9, 0.55][:n]
    weights = [0.5, -0.25, 1.0, 0.3][:n]
    if mcase == 2:
        weights = [0.0] * n  # zero divisor guard
    scales = torch.tensor([1.0, 2.0, 0.75, 1.5][:n], dtype=torch.float32)
    seed = 1234 + mcase
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        expect = ref_merging.fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights,
                                         sign_source, consensus, divisor, normalize, lambda_, out_dtype)
        inp = _Inputs(base, tensors)
        out = torch.empty(shape, dtype=out_dtype)
        thr = thresholds.contiguous()
        kp = torch.tensor(keep_probs, dtype=torch.float64)
        w = torch.tensor(weights, dtype=torch.float64)
        lib.pk_fused_merge(*inp.head(), sparsifier, _ptr(thr), _ptr(kp), seed, _ptr(scales), _ptr(w), sign_source,
                           consensus, divisor, int(normalize), lambda_, _ptr(out), DTYPE_CODES[out_dtype])
        nan = expect.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].float(), expect[~nan].float()), out_dtype


@pytest.mark.parametrize("sparsifier", [0, 1, 2, 3])
def test_l1_norms_match_reference(lib, sparsifier):
    gen = torch.Generator().manual_seed(sparsifier)
    base, tensors = _random_tensors(gen, 3, (5000,), [torch.float32, torch.bfloat16], torch.float16, "gauss")
    thresholds = _thresholds_for(sparsifier, base, tensors, 0.2)
    keep_probs = [0.25, 1.0, 0.6]
    seed = 99
    expect = ref_merging.delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)
    inp = _Inputs(base, tensors)
    out = torch.empty(3, 2, dtype=torch.float64)
    kp = torch.tensor(keep_probs, dtype=torch.float64)
    lib.pk_l1_norms(*inp.head(), sparsifier, _ptr(thresholds.contiguous()), _ptr(kp), seed, 1024, _ptr(out))
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=0)
    if sparsifier == 0:
        assert torch.equal(out[:, 0], out[:, 1])


def host_keep_mask(lib, base, tensors, sparsifier, thresholds, keep_probs, seed):
    inp = _Inputs(base, tensors)
    out = torch.empty(len(tensors), tensors[0].numel(), dtype=torch.uint8)
    thr = thresholds.contiguous()
    kp = torch.tensor(keep_probs, dtype=torch.float64)
    lib.pk_keep_mask(*inp.head(), sparsifier, _ptr(thr), _ptr(kp), seed, _ptr(out))
    return out.bool()


@pytest.mark.parametrize("pattern", ["ties", "special", "gauss"])
@pytest.mark.parametrize("sparsifier", [1, 2, 3])
def test_keep_masks_match_reference(lib, sparsifier, pattern):
    """keep_element() (the kernels' per-element mask) equals reference.merging.keep_of bit for bit."""
    gen = torch.Generator().manual_seed(sparsifier * 7 + len(pattern))
    n = 6
    base, tensors = _random_tensors(gen, n, (3001,), [torch.bfloat16, torch.float32, torch.float16], torch.bfloat16,
                                    pattern)
    thresholds = _thresholds_for(sparsifier, base, tensors, 0.4)
    keep_probs = [0.3, 1.0, 0.0, 0.55, 0.9, 0.1]
    got = host_keep_mask(lib, base, tensors, sparsifier, thresholds, keep_probs, 77)
    for m, t in enumerate(tensors):
        d = ref_selection.task_vector(base, t)
        want = ref_merging.keep_of(d, m, sparsifier, thresholds, keep_probs, 77)
        assert torch.equal(got[m], want), m
        if sparsifier == 3:
            ka, kb = ref_merging.band_counts(*BAND_SETTINGS[m % len(BAND_SETTINGS)], t.numel())
            assert int(got[m].sum()) == ka - kb


def test_band_keep_degenerate_rows(lib):
    """keep_by_band on rows selecting everything (key -1), nothing (2^32), b above a, equal edges, NaN keys."""
    x = torch.tensor([0.5, -0.25, float("nan"), 0.5, 2.0, -0.5, float("inf"), 0.25, -2.0, 0.125, -0.0, 0.5])
    key = int(ref_selection.magnitude_keys(torch.tensor([0.5]))[0])
    rows = [[-1, -1, KEEP_NONE, -1], [-1, -1, key, 3], [key, 5, KEEP_NONE, -1], [KEEP_NONE, -1, -1, -1],
            [key, 3, key, 5], [key, 5, key, 0], [key, 11, key, 3], [0, 0, 0x7F800001, 2],
            [0x7F800000, 6, 0x7F800001, -1], [0, -1, 0, 10]]
    thresholds = torch.tensor(rows, dtype=torch.int64)
    tensors = [x] * len(rows)
    got = host_keep_mask(lib, None, tensors, 3, thresholds, [1.0] * len(rows), 0)
    keys = ref_selection.magnitude_keys(x)
    for m, row in enumerate(rows):
        assert torch.equal(got[m], ref_merging.band_keep(keys, *row)), row


def test_threshold_columns(lib):
    assert [lib.pk_threshold_columns(s) for s in range(5)] == [0, 2, 0, 4, 0]


# ---------------------------------------------------------------------------------------------------------
def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA compile check needs the CUDA toolkit")
def test_check_cuda_script_compiles_everything():
    # nvcc for sm_80 + sm_90 (~10 s per .cu file) and a syntax check of bindings.cpp (~10 s)
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "check_cuda.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check_cuda: OK      csrc/cuda/merging.cu" in done.stdout
    assert "all CUDA sources compile" in done.stdout
