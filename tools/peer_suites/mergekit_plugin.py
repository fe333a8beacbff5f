"""pytest plugin (`-p mergekit_plugin`, with tools/peer_suites on PYTHONPATH): runs a test session with
pykernels.integrations.mergekit.patch() applied before any test module is imported, so the tests' own
`from mergekit.sparsify import ...` see the patched functions; unpatches at the end and prints how many calls
ran on pykernels and how many went to mergekit's own code (the documented fallbacks)."""
from __future__ import annotations

import os


def pytest_configure(config):
    from pykernels.integrations import mergekit as pk_mergekit

    pk_mergekit.patch()
    config._pykernels_mergekit = pk_mergekit


def pytest_report_header(config):
    pk_mergekit = getattr(config, "_pykernels_mergekit", None)
    if pk_mergekit is not None:
        import pykernels

        return (f"pykernels mergekit patch active (pykernels from {os.path.dirname(pykernels.__file__)}, "
                f"base seed {pk_mergekit.base_seed()})")
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    pk_mergekit = getattr(config, "_pykernels_mergekit", None)
    if pk_mergekit is None:
        return
    counts = pk_mergekit.stats()
    terminalreporter.write_sep("-", "pykernels mergekit patch")
    for kind in ("routed", "fallback"):
        items = ", ".join(f"{name} {n}" for name, n in sorted(counts[kind].items())) or "none"
        terminalreporter.write_line(f"{kind}: {items}")


def pytest_unconfigure(config):
    pk_mergekit = getattr(config, "_pykernels_mergekit", None)
    if pk_mergekit is not None:
        pk_mergekit.unpatch()
