"""The console script: `pykernels check` passes here, and the bench table builds (tiny size, one method)."""
import subprocess
import sys

import pytest

from pykernels import benchmarking


def test_check_passes():
    done = subprocess.run([sys.executable, "-m", "pykernels", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 failed" in done.stdout


def test_bench_table_tiny():
    rows = benchmarking.merging_table(shape=benchmarking.SIZES["tiny"], dtypes=("bfloat16",), methods=("ties",),
                                      repeats=1, progress=lambda s: None,
                                      only=("floor", "chained_add", "pykernels", "reference"))
    row = rows[0]
    for impl in ("floor", "chained_add", "pykernels", "reference"):
        assert row[impl]["seconds"] > 0, (impl, row[impl])
        assert row[impl]["peak_extra_bytes"] >= 0
    table = benchmarking.format_merging_table(rows)
    assert "| ties | bfloat16 |" in table


def test_speedup_series_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from pykernels.cli import plot_speedups

    t = lambda s: {"seconds": s}  # noqa: E731
    results = {
        "merging": [{"method": "ties", "dtype": "float32", "pykernels": t(1.0), "mergekit": t(50.0)}],
        "selection": [{"op": "kth / median", "shape": [100], "kth_largest": t(2.0), "torch.kthvalue": t(8.0)},
                      {"op": "per-row rank", "shape": [4, 5], "rank": t(1.0), "argsort(argsort)": t(3.0)}],
        "attention": [{"n": 4096, "dtype": "float32", "inputs": "topics", "threshold": 0.9, "cpp": t(1.0),
                       "sdpa": t(4.0)}],
        "moe": [{"tokens": 16, "experts": 8, "k": 2, "grouped": False, "route cpp": t(1.0), "route torch": t(5.0),
                 "align+permute cpp": t(2.0), "align+permute torch": t(6.0)}],
    }
    labels, series = benchmarking.speedup_series("selection", results["selection"])
    assert series["vs torch.kthvalue"] == [4.0, None] and series["vs argsort(argsort)"] == [None, 3.0]
    labels, series = benchmarking.speedup_series("moe", results["moe"])
    assert series["route vs torch"] == [5.0] and series["align+permute vs torch"] == [3.0]
    assert series["route vs reference"] == [None]
    path = tmp_path / "speedups.png"
    plot_speedups(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
