"""int64 index math on a real tensor above 2^31 elements (bf16, ~4.3 GB; skipped without enough memory)."""
import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels.reference.merging import philox_uniform

NUMEL = 2**31 + 17


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


pytestmark = [
    pytest.mark.skipif(not _backend.cpp_available(), reason="pykernels._C not built"),
    pytest.mark.skipif(available_gib() < 14, reason="needs ~9 GiB free"),
]


@pytest.fixture(scope="module")
def big():
    return torch.ones(NUMEL, dtype=torch.bfloat16)


def test_tie_cutoff_beyond_2_31(big):
    k = 2**31 + 5  # every element ties: the cutoff is the k-th index
    (key, cutoff), = pk.delta_topk_thresholds(None, [big], [k]).tolist()
    assert key == 0x3F800000 and cutoff == k - 1


def test_random_mask_beyond_2_31(big):
    out = pk.sparsify(big, "random", 0.5, seed=9, rescale=False)
    tail = torch.arange(NUMEL - 4096, NUMEL)
    expected = philox_uniform(9, tail) < 0.5  # model 0's stream is the seed itself
    assert torch.equal(out[-4096:] != 0, expected)
    del out


def test_order_statistics_beyond_2_31(big):
    big[NUMEL - 3] = 4.0  # the maximum, past index 2^31
    big[2**31 + 1] = 0.0  # two tied minima: which zero is selected decides the sign
    big[NUMEL - 9] = -0.0
    try:
        assert pk.kth_largest(big, 1).item() == 4.0
        last = pk.kth_largest(big, NUMEL)  # descending stable order: the higher-index zero comes last
        assert last.item() == 0.0 and last.signbit()
        first = pk.quantile(big, 0.0, interpolation="lower")  # ascending stable order: the lower-index zero first
        assert first.item() == 0.0 and not first.signbit()
        mask = pk.topk_mask(big, 2**31 + 2)  # the 4.0 plus the first 2^31 + 1 ones, in index order
        assert int(mask.sum()) == 2**31 + 2 and bool(mask[NUMEL - 3]) and not bool(mask[NUMEL - 4])
        del mask
        st = pk.StreamingThreshold(2)
        st.update(big)
        assert st.resolve([big]).value == 1.0
    finally:
        big[NUMEL - 3] = big[NUMEL - 9] = big[2**31 + 1] = 1.0
