"""Workloads of `pykernels bench` and benchmarks/: each kernel beside the reference, the peers (when
installed) and the memory-bandwidth floor, timed in one run on the same inputs.

Timing: inputs are created and touched before timing (a fresh VM pays ~1.3 s/GB on first touch), each
implementation is warmed up once, then the median of `repeats` runs is reported. Peak extra memory is read
from /proc/self/status (VmHWM after clearing it through /proc/self/clear_refs), in a fresh subprocess per
measurement so allocator caches of earlier runs do not hide it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
SIZES = {"default": (4096, 11008), "small": (1024, 2048), "tiny": (64, 96)}


@dataclass
class Workload:
    method: str
    dtype: torch.dtype
    shape: tuple
    n_models: int = 3
    density: float = 0.2


def make_inputs(w: Workload, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(w.shape, generator=g).to(w.dtype)
    tensors = []
    for _ in range(w.n_models):
        t = torch.randn(w.shape, generator=g).mul_(0.01).add_(base.float())
        tensors.append(t.to(w.dtype))
    return base, tensors


def _weights(n):
    return [1.0 / n + 0.1 * i for i in range(n)]


def implementations(w: Workload) -> dict[str, Callable]:
    """name -> fn(base, tensors) for everything that can run this workload here."""
    import pykernels as pk

    weights = _weights(w.n_models)
    dens = [w.density] * w.n_models
    sparse = w.method in ("ties", "dare_ties", "dare_linear")
    kw = dict(weights=weights, **({"densities": dens} if sparse else {}))

    def ours(backend):
        if w.method == "linear":
            return lambda b, ts: pk.merge(None, ts, "linear", backend=backend, **kw)
        return lambda b, ts: pk.merge(b, ts, w.method, backend=backend, **kw)

    impls = {"floor": one_add, "floor_fresh_output": one_add_fresh_output, "chained_add": chained_add, "pykernels": ours("cpp"),
             "reference": ours("reference")}
    try:
        from mergekit.merge_methods.api import merge_tensors

        params = {"weight": weights, **({"density": dens} if sparse else {})}
        if w.method == "linear":
            impls["mergekit"] = lambda b, ts: merge_tensors(ts, "linear", parameters=params)
        else:
            impls["mergekit"] = lambda b, ts: merge_tensors([b] + ts, w.method, parameters=params, base_index=0)
    except ImportError:
        pass
    try:
        from peft.utils import merge_utils as pm

        wt = torch.tensor(weights, dtype=w.dtype)
        peft_fns = {
            "task_arithmetic": lambda ds: pm.task_arithmetic(ds, wt),
            "ties": lambda ds: pm.ties(ds, wt, w.density),
            "dare_ties": lambda ds: pm.dare_ties(ds, wt, w.density),
            "dare_linear": lambda ds: pm.dare_linear(ds, wt, w.density),
        }
        if w.method in peft_fns:
            fn = peft_fns[w.method]
            impls["peft"] = lambda b, ts: b + fn([t - b for t in ts])
    except ImportError:
        pass
    return impls


def chained_add(base, tensors):
    """PyTorch's best streaming merge: chained adds into a preallocated buffer (N passes over the output)."""
    out = torch.empty_like(base)
    torch.add(base, tensors[0], out=out)
    for t in tensors[1:]:
        out.add_(t)
    return out


_FLOOR_OUT: dict = {}


def one_add(base, tensors):
    """One torch.add into a preallocated buffer: pure streaming, no page faults of a fresh output."""
    key = (base.shape, base.dtype)
    if key not in _FLOOR_OUT:
        _FLOOR_OUT[key] = torch.empty_like(base)
    return torch.add(base, tensors[0], out=_FLOOR_OUT[key])


def one_add_fresh_output(base, tensors):
    """One torch.add into a new tensor: the floor including the page faults of a fresh output, which every
    allocating API (pykernels' included) pays."""
    return torch.add(base, tensors[0])


def floor_seconds(add_seconds: float, n_models: int) -> float:
    """The memory-bandwidth floor of a fused merge: (N+1) input reads + 1 output write, at the bandwidth of
    one torch.add (2 reads + 1 write of the same size)."""
    return add_seconds * (n_models + 2) / 3


def time_fn(fn, args, repeats: int) -> float:
    fn(*args)  # warm-up: page faults, allocator, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, args) -> int:
    """Peak resident memory above the current level while fn runs (first run: nothing cached)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    fn(*args)
    return (_rss_kib("VmHWM") - before) * 1024


def measure_one(method: str, dtype: str, shape: tuple, impl: str, repeats: int, threads: int) -> dict:
    """Run in a fresh process: peak extra memory of the first run, then the median time."""
    torch.set_num_threads(threads)
    w = Workload(method, getattr(torch, dtype), tuple(shape))
    base, tensors = make_inputs(w)
    fn = implementations(w)[impl]
    peak = peak_extra_bytes(fn, (base, tensors))
    seconds = time_fn(fn, (base, tensors), repeats)
    if impl.startswith("floor"):
        seconds = floor_seconds(seconds, w.n_models)
    return {"seconds": seconds, "peak_extra_bytes": peak}


def measure_in_subprocess(method, dtype, shape, impl, repeats, threads) -> dict:
    code = ("import json,sys; from pykernels.benchmarking import measure_one; "
            f"print(json.dumps(measure_one({method!r}, {dtype!r}, {tuple(shape)!r}, {impl!r}, {repeats}, {threads})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


SLOW = {"reference", "mergekit", "peft"}


def merging_table(shape=SIZES["default"], dtypes=("float32", "bfloat16"), methods=MERGE_METHODS, threads=2,
                  repeats=5, progress=print, only=None) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for method in methods:
            w = Workload(method, getattr(torch, dtype), tuple(shape))
            names = [name for name in implementations(w) if only is None or name in only]
            row = {"method": method, "dtype": dtype, "shape": list(shape), "n_models": w.n_models}
            for impl in names:
                if impl == "reference" and method.startswith("dare") and shape[0] * shape[1] > 1 << 22:
                    # Philox written as int64 torch ops: minutes per call at this size; checked at small sizes.
                    row[impl] = {"skipped": "reference Philox too slow at this size"}
                    continue
                progress(f"  {method:16s} {dtype:9s} {impl:10s} ...")
                row[impl] = measure_in_subprocess(method, dtype, shape, impl, 1 if impl in SLOW else repeats,
                                                  threads)
            rows.append(row)
    return rows


def format_merging_table(rows: list[dict]) -> str:
    """Markdown: pykernels' time, then every other implementation as a ratio to it (x > 1: pykernels is
    faster; for the floor, pykernels' time in floors), and peak extra memory in units of one output."""
    def secs(r, name):
        return r.get(name, {}).get("seconds")

    def mem(r, name):
        out_bytes = r["shape"][0] * r["shape"][1] * (4 if r["dtype"] == "float32" else 2)
        peak = r.get(name, {}).get("peak_extra_bytes")
        return f"{peak / out_bytes:.2f}" if peak is not None else "n/a"

    lines = ["| method | dtype | pykernels ms | x floor (preallocated output) | x floor (fresh output) | "
             "chained torch.add / pykernels | reference / pykernels | mergekit / pykernels | peft / pykernels | "
             "peak extra mem, x output: pykernels / mergekit / peft |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = secs(r, "pykernels")
        ratio = lambda name: f"{secs(r, name) / ours:.1f}" if secs(r, name) and ours else "n/a"
        floors = lambda name: f"{ours / secs(r, name):.2f}" if ours and secs(r, name) else "n/a"
        lines.append(f"| {r['method']} | {r['dtype']} | {ours * 1e3:.1f} | {floors('floor')} | "
                     f"{floors('floor_fresh_output')} | {ratio('chained_add')} | "
                     f"{ratio('reference')} | {ratio('mergekit')} | {ratio('peft')} | "
                     f"{mem(r, 'pykernels')} / {mem(r, 'mergekit')} / {mem(r, 'peft')} |")
    return "\n".join(lines)
