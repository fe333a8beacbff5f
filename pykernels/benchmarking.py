"""Workloads of `pykernels bench` and benchmarks/: each kernel beside the reference, the peers (when
installed) and the memory-bandwidth floor, timed in one run on the same inputs.

Timing: inputs are created and touched before timing (a fresh VM pays ~1.3 s/GB on first touch), each
implementation is warmed up once, then the median of `repeats` runs is reported. Peak extra memory is read
from /proc/self/status (VmHWM after clearing it through /proc/self/clear_refs), in a fresh subprocess per
measurement so allocator caches of earlier runs do not hide it.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della")
SPARSE_METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
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
    sparse = w.method in SPARSE_METHODS
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


def time_once(fn, args) -> float:
    """One cold call (for implementations too slow to repeat)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


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
                if impl == "reference" and method.startswith(("dare", "della")) and shape[0] * shape[1] > 1 << 22:
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


# --- order statistics ---------------------------------------------------------------------------------------

SELECTION_SIZES = {"default": (10**6, 16 * 10**6, 10**8), "small": (10**6, 4 * 10**6), "tiny": (10**4,)}
RANK_SHAPES = {"default": (4096, 11008), "small": (1024, 2048), "tiny": (64, 96)}
TORCH_QUANTILE_LIMIT = 1 << 24


def selection_implementations(n: int) -> dict[str, Callable]:
    """name -> fn(x) for the k-th largest (k = n // 2) and the median of n fp32 elements."""
    import pykernels as pk

    k = n // 2
    impls = {
        "read_floor": lambda x: torch.sum(x),  # one read pass over the data
        "kth_largest": lambda x: pk.kth_largest(x, k),
        "quantile": lambda x: pk.quantile(x, 0.5),
        "torch.kthvalue": lambda x: torch.kthvalue(x, n - k + 1),  # the same element, counted from below
    }
    if n <= TORCH_QUANTILE_LIMIT:
        impls["torch.quantile"] = lambda x: torch.quantile(x, 0.5)
    return impls


def rank_implementations() -> dict[str, Callable]:
    import pykernels as pk

    return {
        "read_floor": lambda x: torch.sum(x),
        "rank": lambda x: pk.rank(x, dim=-1),
        "argsort(argsort)": lambda x: torch.argsort(torch.argsort(x.abs(), dim=-1, stable=True), dim=-1,
                                                    stable=True) + 1,
    }


def selection_table(size: str = "default", threads: int = 2, repeats: int = 5, progress=print) -> list[dict]:
    """Times of the order statistics beside torch and one read pass, measured in this process, same inputs."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in SELECTION_SIZES[size]:
        x = torch.randn(n, generator=g)
        row = {"op": "kth / median", "shape": [n]}
        for name, fn in selection_implementations(n).items():
            progress(f"  selection n={n:.2g} {name} ...")
            row[name] = {"seconds": time_fn(fn, (x,), 1 if name.startswith("torch") and n > 10**7 else repeats)}
        rows.append(row)
        del x
    shape = RANK_SHAPES[size]
    x = torch.randn(shape, generator=g)
    row = {"op": "per-row rank", "shape": list(shape)}
    for name, fn in rank_implementations().items():
        progress(f"  rank {shape} {name} ...")
        row[name] = {"seconds": time_fn(fn, (x,), repeats)}
    rows.append(row)
    return rows


def format_selection_table(rows: list[dict]) -> str:
    """Markdown: our time, in read passes over the data, and torch's time as a ratio to ours."""
    lines = ["| op | elements | ours ms | x one read pass | torch.kthvalue / ours | torch.quantile / ours | "
             "argsort(argsort) / ours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        def secs(name):
            return r.get(name, {}).get("seconds")

        ours_name = "rank" if "rank" in r else "kth_largest"
        ours = secs(ours_name)
        ratio = lambda name: f"{secs(name) / ours:.1f}" if secs(name) and ours else "n/a"
        label = r["op"] if ours_name == "rank" else "kth_largest (quantile)"
        ours_ms = f"{ours * 1e3:.1f}" + (f" ({secs('quantile') * 1e3:.1f})" if secs("quantile") else "")
        elements = "x".join(str(s) for s in r["shape"])
        lines.append(f"| {label} | {elements} | {ours_ms} | {ours / secs('read_floor'):.2f} | "
                     f"{ratio('torch.kthvalue')} | {ratio('torch.quantile')} | {ratio('argsort(argsort)')} |")
    return "\n".join(lines)


class SyntheticModel:
    """A Mapping of tensor name -> fp32 tensor generated on access from a per-name seed: a model of any size
    that never sits in memory as a whole (Llama-like shapes, `layers` blocks)."""

    def __init__(self, layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000, seed: int = 0):
        self.shapes = {"embed": (vocab, hidden)}
        for i in range(layers):
            for name, shape in (("q", (hidden, hidden)), ("k", (hidden // 4, hidden)), ("v", (hidden // 4, hidden)),
                                ("o", (hidden, hidden)), ("gate", (intermediate, hidden)),
                                ("up", (intermediate, hidden)), ("down", (hidden, intermediate))):
                self.shapes[f"layers.{i}.{name}"] = shape
        self.seed = seed

    def __len__(self):
        return len(self.shapes)

    def __iter__(self):
        return iter(self.shapes)

    def keys(self):
        return self.shapes.keys()

    def __contains__(self, name):
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        index = list(self.shapes).index(name)
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        return torch.randn(self.shapes[name], generator=g)

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for s in self.shapes.values()) * 4


def streaming_threshold_run(layers: int, density: float = 0.1) -> dict:
    """Global magnitude threshold over a SyntheticModel streamed tensor by tensor: time and peak extra memory
    (run it in a fresh process: see measure_streaming_in_subprocess)."""
    import pykernels as pk

    model = SyntheticModel(layers)
    names = list(model.keys())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    st = pk.StreamingThreshold(density=density)
    for name in names:
        st.update(model[name])
    threshold = st.resolve(lambda i: model[names[i]])
    seconds = time.perf_counter() - t0
    peak = (_rss_kib("VmHWM") - before) * 1024
    return {"parameters": model.numel(), "seconds": seconds, "peak_extra_bytes": peak,
            "largest_tensor_bytes": model.largest_tensor_bytes(), "threshold": threshold.value}


def measure_streaming_in_subprocess(layers: int, threads: int = 2) -> dict:
    code = ("import json; from pykernels.benchmarking import streaming_threshold_run; "
            f"print(json.dumps(streaming_threshold_run({layers})))")
    # Freed tensors below glibc's dynamic mmap threshold (up to 32 MiB) stay in fragmented heap arenas and
    # inflate VmHWM with memory nothing holds; mmap-ing every allocation >= 1 MiB measures live memory.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- attention (PBS-Attn) -------------------------------------------------------------------------------

ATTENTION_SIZES = {"default": (4096, 8192, 16384), "small": (1024, 2048), "tiny": (512,)}
ATTENTION_SHAPE = dict(batch=1, q_heads=8, kv_heads=2, head_dim=128)
ATTENTION_PLAN = dict(block_size=128, segment_size=256)


def topic_qkv(n: int, dtype=torch.float32, seed: int = 0, topics: int = 4, run: int = 512, strength: float = 1.5):
    """q, k, v (1, 8, n, 128) / (1, 2, n, 128) with long-context structure: tokens come in runs of `run` on one of
    `topics` topics (queries and keys of a topic share a direction, so a query attends mostly to its topic's
    keys wherever they are), plus a strong first token. At threshold 0.9 the PBS plan keeps ~20-45% of blocks."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = (ATTENTION_SHAPE[key] for key in ("batch", "q_heads", "kv_heads", "head_dim"))
    centers = torch.nn.functional.normalize(torch.randn(topics, d, generator=g), dim=-1) * math.sqrt(d) * strength
    topic = torch.randint(topics, (b, -(-n // run)), generator=g).repeat_interleave(run, 1)[:, :n]
    q = torch.randn(b, hq, n, d, generator=g) + centers[topic].unsqueeze(1)
    k = torch.randn(b, hkv, n, d, generator=g) + centers[topic].unsqueeze(1)
    k[:, :, 0] = 4 * centers.mean(0) * math.sqrt(topics)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_qkv(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = (ATTENTION_SHAPE[key] for key in ("batch", "q_heads", "kv_heads", "head_dim"))
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention_implementations(threshold: float) -> dict[str, Callable]:
    """name -> fn(q, k, v): the dense baseline, our kernel end to end, and the reference."""
    import pykernels as pk

    def pbs(backend):
        return lambda q, k, v: pk.pbs_attention(q, k, v, threshold=threshold, backend=backend, **ATTENTION_PLAN)

    return {"sdpa": _sdpa, "cpp": pbs("cpp"), "reference": pbs("reference")}


def attention_row(n: int, dtype: str, inputs: str, threshold: float, repeats: int = 3,
                  with_reference: bool = True) -> dict:
    """Times (plan and attention apart), density and error vs dense SDPA for one input, in this process."""
    import pykernels as pk

    make = topic_qkv if inputs == "topics" else random_qkv
    q, k, v = make(n, getattr(torch, dtype))
    row = {"n": n, "dtype": dtype, "inputs": inputs, "threshold": threshold}
    plan_fn = lambda q, k: pk.pbs_plan(q, k, threshold=threshold, backend="cpp", **ATTENTION_PLAN)  # noqa: E731
    plan = plan_fn(q, k)
    row["density"] = plan.density
    row["plan"] = {"seconds": time_fn(plan_fn, (q, k), repeats)}
    row["attention"] = {"seconds": time_fn(lambda: pk.block_sparse_attention(q, k, v, plan, backend="cpp"), (),
                                           repeats)}
    row["cpp"] = {"seconds": row["plan"]["seconds"] + row["attention"]["seconds"]}
    row["sdpa"] = {"seconds": time_fn(_sdpa, (q, k, v), repeats)}
    out = pk.block_sparse_attention(q, k, v, plan, backend="cpp").float()
    row["max_abs_diff_vs_sdpa"] = (out - _sdpa(q.float(), k.float(), v.float())).abs().max().item()
    if with_reference:
        ref_fn = attention_implementations(threshold)["reference"]
        row["reference"] = {"seconds": time_once(ref_fn, (q, k, v))}
    return row


def measure_attention_memory(n: int, dtype: str, impl: str, threshold: float = 0.9) -> dict:
    """Peak extra resident memory of one first call of `impl`, in this (fresh) process."""
    q, k, v = topic_qkv(n, getattr(torch, dtype))
    return {"peak_extra_bytes": peak_extra_bytes(attention_implementations(threshold)[impl], (q, k, v))}


def attention_memory_in_subprocess(n: int, dtype: str, impl: str, threads: int) -> dict:
    code = ("import json, torch; from pykernels.benchmarking import measure_attention_memory; "
            f"torch.set_num_threads({threads}); print(json.dumps(measure_attention_memory({n}, {dtype!r}, {impl!r})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_table(size: str = "default", threads: int = 2, repeats: int = 3, progress=print) -> list[dict]:
    """Every size x dtype: structured inputs at threshold 0.9 and 1.0 (dense plan), random inputs at 0.9; the
    reference beside them up to 8192 tokens (minutes beyond); peak memory at the largest size."""
    torch.set_num_threads(threads)
    rows = []
    sizes = ATTENTION_SIZES[size]
    for dtype in ("float32", "bfloat16"):
        for n in sizes:
            for inputs, threshold in (("topics", 0.9), ("topics", 1.0), ("random", 0.9)):
                progress(f"  attention n={n} {dtype} {inputs} threshold={threshold} ...")
                rows.append(attention_row(n, dtype, inputs, threshold, repeats,
                                          with_reference=threshold == 0.9 and inputs == "topics" and n <= 8192))
        for impl in ("sdpa", "cpp"):
            progress(f"  attention memory n={sizes[-1]} {dtype} {impl} ...")
            rows[-1][f"memory_{impl}"] = attention_memory_in_subprocess(sizes[-1], dtype, impl, threads)
    return rows


def format_attention_table(rows: list[dict]) -> str:
    """Markdown: ours (plan + attention) beside dense SDPA and the reference, as ratios measured in one run."""
    lines = ["| N | dtype | inputs | threshold | density | plan ms | attention ms | SDPA ms | SDPA / ours | "
             "reference / ours | max abs diff vs fp32 SDPA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = r["cpp"]["seconds"]
        ref = f"{r['reference']['seconds'] / ours:.1f}" if "reference" in r else "n/a"
        lines.append(f"| {r['n']} | {r['dtype']} | {r['inputs']} | {r['threshold']} | {r['density']:.3f} | "
                     f"{r['plan']['seconds'] * 1e3:.0f} | {r['attention']['seconds'] * 1e3:.0f} | "
                     f"{r['sdpa']['seconds'] * 1e3:.0f} | {r['sdpa']['seconds'] / ours:.2f} | {ref} | "
                     f"{r['max_abs_diff_vs_sdpa']:.1e} |")
    memory = [(r["dtype"], r["n"], r["memory_sdpa"], r["memory_cpp"]) for r in rows if "memory_cpp" in r]
    for dtype, n, sdpa, ours in memory:
        if "peak_extra_bytes" in sdpa and "peak_extra_bytes" in ours:
            lines.append(f"\npeak extra memory, N={n} {dtype}: pbs_attention {ours['peak_extra_bytes'] / 2**20:.1f} MiB,"
                         f" SDPA {sdpa['peak_extra_bytes'] / 2**20:.1f} MiB "
                         f"({ours['peak_extra_bytes'] / sdpa['peak_extra_bytes']:.2f}x)")
    return "\n".join(lines)


# --- MoE routing ----------------------------------------------------------------------------------------------

MOE_TOKENS = {"default": (4096, 65536), "small": (4096,), "tiny": (256,)}
MOE_CASES = [(experts, k) for experts in (8, 64, 256) for k in (2, 8) if k < experts]
MOE_HIDDEN = 1024          # bf16 rows permuted per (token, expert) pair
DEEPSEEK_V3 = dict(experts=256, k=8, num_groups=8, topk_groups=4, scaling=2.5)


def torch_route(logits, k):
    """The plain PyTorch router: softmax -> topk -> renormalize."""
    weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def torch_grouped_route(logits, bias, k, num_groups, topk_groups, scaling):
    """DeepSeek-V3 routing in PyTorch: sigmoid, biased group scores (sum of top-2), top groups, top-k."""
    scores = torch.sigmoid(logits.float())
    keys = scores + bias
    tokens, experts = keys.shape
    group_scores = keys.view(tokens, num_groups, -1).topk(2, dim=-1).values.sum(-1)
    groups = group_scores.topk(topk_groups, dim=-1).indices
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    keys = keys.masked_fill(~allowed.repeat_interleave(experts // num_groups, 1), float("-inf"))
    ids = keys.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True) * scaling, ids.to(torch.int32)


def torch_align_permute(x, ids, num_experts, block_size):
    """vLLM-style alignment and token permutation in PyTorch: stable argsort -> counts -> padding, gather."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    rank_in_expert = torch.arange(flat.numel()) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    capacity = -(-(flat.numel() + num_experts * (block_size - 1)) // block_size) * block_size
    sorted_ids = torch.full((capacity,), flat.numel(), dtype=torch.int32)
    sorted_ids[starts[flat[order]] + rank_in_expert] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(num_experts), padded // block_size)
    return sorted_ids, block_expert, x[order // ids.shape[1]]


def moe_implementations(experts: int, k: int, grouped: bool) -> dict[str, Callable]:
    """name -> fn(logits, bias, x): routing alone, and routing-independent align + permute (given ids)."""
    import pykernels as pk

    floor = {"route floor": lambda logits, bias, x: torch.sum(logits)}  # one read pass over the logits
    if grouped:
        g = {key: DEEPSEEK_V3[key] for key in ("num_groups", "topk_groups", "scaling")}
        ours = lambda be: lambda logits, bias, x: pk.topk_route(logits, k, scoring="sigmoid", bias=bias,  # noqa: E731
                                                                 backend=be, **g)
        return {"route torch": lambda logits, bias, x: torch_grouped_route(logits, bias, k, **g),
                "route cpp": ours("cpp"), "route reference": ours("reference"), **floor}
    ours = lambda be: lambda logits, bias, x: pk.topk_route(logits, k, backend=be)  # noqa: E731
    return {"route torch": lambda logits, bias, x: torch_route(logits, k), "route cpp": ours("cpp"),
            "route reference": ours("reference"), **floor}


def sequential_copy(x, k):
    """The floor of a permute: the same bytes written to a fresh output, read in order (x repeated k times)."""
    return x.unsqueeze(0).expand(k, -1, -1).reshape(-1, x.shape[1])


def moe_table(size: str = "default", threads: int = 2, repeats: int = 5, progress=print) -> list[dict]:
    """Router and align + permute timings beside the PyTorch versions, measured in this process."""
    import pykernels as pk

    torch.set_num_threads(threads)
    rows = []
    cases = [(e, k, False) for e, k in MOE_CASES] + [(DEEPSEEK_V3["experts"], DEEPSEEK_V3["k"], True)]
    for tokens in MOE_TOKENS[size]:
        for experts, k, grouped in cases:
            if grouped and tokens != MOE_TOKENS[size][-1]:
                continue
            g = torch.Generator().manual_seed(tokens + experts)
            logits = torch.randn(tokens, experts, generator=g)
            bias = 0.1 * torch.randn(experts, generator=g)
            x = torch.randn(tokens, MOE_HIDDEN, generator=g).to(torch.bfloat16)
            row = {"tokens": tokens, "experts": experts, "k": k, "grouped": grouped}
            for name, fn in moe_implementations(experts, k, grouped).items():
                progress(f"  moe T={tokens} E={experts} k={k} grouped={grouped} {name} ...")
                row[name] = {"seconds": time_fn(fn, (logits, bias, x), repeats)}
            if not grouped:
                _, ids = pk.topk_route(logits, k, backend="cpp")
                align_permute = lambda: (pk.align_block_size(ids, experts, 64, backend="cpp"),  # noqa: E731
                                         pk.permute(x, ids, experts, backend="cpp"))
                row["align+permute cpp"] = {"seconds": time_fn(align_permute, (), repeats)}
                row["align+permute torch"] = {"seconds": time_fn(torch_align_permute, (x, ids, experts, 64), repeats)}
                row["align+permute floor"] = {"seconds": time_fn(sequential_copy, (x, k), repeats)}
            rows.append(row)
    return rows


def format_moe_table(rows: list[dict]) -> str:
    """Markdown: ours in units of the memory floor, and torch's / the reference's time as ratios to ours."""
    lines = ["| T | E | k | routing | route cpp ms | x floor | torch / cpp | reference / cpp | align+permute cpp ms | "
             "x floor | torch / cpp |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = lambda name: r.get(name, {}).get("seconds")  # noqa: E731
        over = lambda name, ours: f"{secs(name) / ours:.1f}" if secs(name) and ours else "n/a"  # noqa: E731
        ours = secs("route cpp")
        kind = "DeepSeek-V3 grouped (8 groups, 4 kept, sigmoid + bias)" if r["grouped"] else "softmax"
        ap = secs("align+permute cpp")
        ap_cells = (f"{ap * 1e3:.1f} | {ap / secs('align+permute floor'):.2f} | {over('align+permute torch', ap)}"
                    if ap else "n/a | n/a | n/a")
        lines.append(f"| {r['tokens']} | {r['experts']} | {r['k']} | {kind} | {ours * 1e3:.2f} | "
                     f"{ours / secs('route floor'):.1f} | {over('route torch', ours)} | "
                     f"{over('route reference', ours)} | {ap_cells} |")
    return "\n".join(lines)


# --- the speed-up chart of `pykernels bench --plot` ------------------------------------------------------------

def _ratios(rows, ours, theirs) -> list:
    """theirs' time / ours' per row (None where either is missing)."""
    secs = lambda r, name: r.get(name, {}).get("seconds") if name else None  # noqa: E731
    return [secs(r, theirs) / secs(r, ours(r)) if secs(r, theirs) and secs(r, ours(r)) else None for r in rows]


def speedup_series(family: str, rows: list[dict]) -> tuple[list[str], dict[str, list]]:
    """(row labels, {"vs <comparator>": speed-ups}) of one family's benchmark rows."""
    if family == "merging":
        labels = [f"{r['method']}\n{r['dtype']}" for r in rows]
        peers = [p for p in ("reference", "mergekit", "peft") if any(p in r for r in rows)]
        return labels, {f"vs {p}": _ratios(rows, lambda r: "pykernels", p) for p in peers}
    if family == "selection":
        labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))}" for r in rows]
        ours = lambda r: "rank" if "rank" in r else "kth_largest"  # noqa: E731
        return labels, {f"vs {p}": _ratios(rows, ours, p)
                        for p in ("torch.kthvalue", "torch.quantile", "argsort(argsort)")}
    if family == "attention":
        labels = [f"N={r['n']} {r['dtype']}\n{r['inputs']} t={r['threshold']}" for r in rows]
        return labels, {f"vs {p}": _ratios(rows, lambda r: "cpp", p) for p in ("sdpa", "reference")}
    if family == "moe":
        labels = [f"T={r['tokens']} E={r['experts']}\nk={r['k']}{' grouped' if r['grouped'] else ''}" for r in rows]
        return labels, {"route vs torch": _ratios(rows, lambda r: "route cpp", "route torch"),
                        "route vs reference": _ratios(rows, lambda r: "route cpp", "route reference"),
                        "align+permute vs torch": _ratios(rows, lambda r: "align+permute cpp", "align+permute torch")}
    raise ValueError(f"unknown benchmark family {family!r}")
