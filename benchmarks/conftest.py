import os

import pytest

from pykernels.benchmarking import SIZES


@pytest.fixture(scope="session")
def shape():
    """PYKERNELS_BENCH_SIZE=default|small|tiny (CI runs tiny)."""
    return SIZES[os.environ.get("PYKERNELS_BENCH_SIZE", "default")]
