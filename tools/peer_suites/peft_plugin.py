"""pytest plugin that routes peft's merge utilities through pykernels for a whole test session.

Load it with ``python -m pytest -p peft_plugin ...`` with this directory (and the pykernels checkout) on
PYTHONPATH. It calls ``pykernels.integrations.peft.patch()`` before any test module is imported (random masks:
the default seed mode, drawn from torch's generator, so the tests' torch.manual_seed calls still fix them) and
prints, at the end, how many calls of each function took the fused pykernels path.
"""
from __future__ import annotations


def pytest_configure(config):
    from pykernels.integrations import peft as pk_peft

    pk_peft.patch()
    config._pykernels_peft = pk_peft


def pytest_report_header(config):
    import pykernels

    return f"pykernels peft patch: on (pykernels {pykernels.__version__} from {pykernels.__file__})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    pk_peft = getattr(config, "_pykernels_peft", None)
    if pk_peft is None:
        return
    counts = pk_peft.stats()
    paths = sorted({path for _, path in counts})
    terminalreporter.write_sep("-", "pykernels peft patch: calls per path")
    if not counts:
        terminalreporter.write_line("no merge_utils function was called")
    for name in sorted({name for name, _ in counts}):
        row = ", ".join(f"{path} {counts[(name, path)]}" for path in paths if (name, path) in counts)
        terminalreporter.write_line(f"{name}: {row}")


def pytest_unconfigure(config):
    pk_peft = getattr(config, "_pykernels_peft", None)
    if pk_peft is not None:
        pk_peft.unpatch()
