"""The console script: `pykernels check` passes here, and the bench table builds (tiny size, one method)."""
import subprocess
import sys

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
