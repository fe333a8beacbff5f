"""End-to-end merge benchmark: the same YAML through `mergekit-yaml` and `pykernels merge`, each in a fresh
subprocess on CPU, on a synthetic Llama-shaped checkpoint family (benchmarks/make_synthetic_llama.py).

    python benchmarks/merge_vs_mergekit.py --root /tmp/merge_bench --size 1b            # ~9 GB of inputs
    python benchmarks/merge_vs_mergekit.py --root /tmp/mb --size small --methods ties   # a quick look

Per method (ties, dare_ties by default): wall time and peak RSS (ru_maxrss of the child, from wait4) of each
tool, with the page cache warmed for both (every input file is read once before each run), then the outputs
compared tensor by tensor:
- ties: fraction of bit-equal elements, max |difference|, and the same split into elements where some model's
  |task vector| equals its top-k threshold (a tie: mergekit's unstable argsort keeps an arbitrary subset of the
  tied elements, pykernels the lowest indices) and the rest (differences there come from mergekit computing in
  bf16 and pykernels in fp32; reported in bf16 ulps).
- dare_ties: masks are random on both sides, so the keep statistics: fraction of output elements that differ
  from the base and the mean |output - base|, per tool.
The inputs are deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

WEIGHTS = [1.0, 0.7, 0.5]
DENSITIES = [0.5, 0.4, 0.6]


def write_yaml(path: Path, dirs: dict, method: str, dtype: str = "bfloat16") -> Path:
    lines = ["models:", f"  - model: {dirs['base']}"]
    for m, (w, rho) in enumerate(zip(WEIGHTS, DENSITIES)):
        lines += [f"  - model: {dirs[f'ft{m}']}", f"    parameters: {{weight: {w}, density: {rho}}}"]
    lines += [f"merge_method: {method}", f"base_model: {dirs['base']}", f"dtype: {dtype}", "out_dtype: bfloat16", ""]
    path.write_text("\n".join(lines))
    return path


def warm(dirs: dict) -> None:
    """Read every input file once so both tools start from the same (warm) page cache."""
    for d in dirs.values():
        for f in sorted(Path(d).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# Runs the command from a small Python process (no torch) and prints its wall time and the peak RSS of the
# command (ru_maxrss of the waited-for children). The benchmark process itself cannot be the parent: a forked
# child's ru_maxrss starts from the parent's resident set, which is large after comparing outputs.
_HELPER = """
import resource, subprocess, sys, time, json
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=sys.stderr)
print(json.dumps({"seconds": time.perf_counter() - t0, "returncode": rc,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def timed(cmd: list[str], env=None) -> dict:
    done = subprocess.run([sys.executable, "-c", _HELPER, *cmd], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        r = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r = {"seconds": float("nan"), "returncode": done.returncode, "peak_rss_bytes": 0}
    r["output_tail"] = done.stderr[-2000:]
    return r


def load_dir(d: Path):
    from pykernels.io import Checkpoint

    return Checkpoint(d)


def compare_ties(base_dir: Path, ft_dirs: list[Path], mk_dir: Path, pk_dir: Path) -> dict:
    from pykernels import kth_largest

    base, fts = load_dir(base_dir), [load_dir(d) for d in ft_dirs]
    mk, pk = load_dir(mk_dir), load_dir(pk_dir)
    total = equal = tied = diff_untied = 0
    max_abs = max_abs_untied = 0.0
    max_ulp_untied = 0
    big_untied = 0
    for name in base.keys():
        a, b = mk.get(name), pk.get(name)
        if a.dtype != b.dtype:
            a = a.to(b.dtype)
        n = a.numel()
        ne = a.view(torch.int16) != b.view(torch.int16)
        total += n
        equal += n - int(ne.sum())
        if ne.any():
            max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
        bt = base.get(name).float()
        at_tie = torch.zeros(a.shape, dtype=torch.bool)
        for ft, rho in zip(fts, DENSITIES):
            d = (ft.get(name).float() - bt).abs()
            k = max(1, int(rho * n))
            if k < n:
                at_tie |= d == kth_largest(d.reshape(-1), k, abs=False)
        tied += int(at_tie.sum())
        rest = ne & ~at_tie
        diff_untied += int(rest.sum())
        if rest.any():
            ai, bi = a.view(torch.int16)[rest].int(), b.view(torch.int16)[rest].int()
            same_sign = (ai >= 0) == (bi >= 0)
            ulps = torch.where(same_sign, (ai - bi).abs(), torch.full_like(ai, 1 << 16))
            max_ulp_untied = max(max_ulp_untied, int(ulps.max()))
            big_untied += int((ulps > 2).sum())
            max_abs_untied = max(max_abs_untied, float((a.float()[rest] - b.float()[rest]).abs().max()))
    return {"elements": total, "equal_fraction": equal / total, "max_abs_diff": max_abs,
            "tie_fraction": tied / total,
            "differ_outside_ties_fraction": diff_untied / total,
            "max_abs_diff_outside_ties": max_abs_untied, "max_ulp_outside_ties": max_ulp_untied,
            "outside_ties_over_2_ulp": big_untied}


def keep_stats(base_dir: Path, out_dir: Path) -> dict:
    base, out = load_dir(base_dir), load_dir(out_dir)
    n = changed = 0
    abs_sum = 0.0
    for name in base.keys():
        b, o = base.get(name), out.get(name)
        n += o.numel()
        changed += int((o.view(torch.int16) != b.to(o.dtype).view(torch.int16)).sum())
        abs_sum += float((o.float() - b.float()).abs().double().sum())
    return {"changed_fraction": changed / n, "mean_abs_change": abs_sum / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/merge_bench"))
    p.add_argument("--size", default="1b", choices=("1b", "small", "tiny"))
    p.add_argument("--methods", nargs="+", default=["ties", "dare_ties"])
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--mergekit-fp32", action="store_true",
                   help="ties: also run mergekit with dtype float32 (it then computes in fp32 like pykernels), to "
                        "separate bf16 arithmetic from tie choices in the output comparison")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--pykernels-args", default="", help="extra arguments for pykernels merge (e.g. '--nproc 2')")
    a = p.parse_args(argv)

    import make_synthetic_llama as synth

    inputs = a.root / f"inputs-{a.size}"
    dirs = {n: inputs / n for n in ["base", "ft0", "ft1", "ft2"]}
    if not all((d / "config.json").exists() for d in dirs.values()):
        shutil.rmtree(inputs, ignore_errors=True)
        synth.make(inputs, a.size, models=3)
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = {"machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}",
               "load_average_at_start": os.getloadavg(), "size": a.size,
               "input_bytes": sum(f.stat().st_size for d in dirs.values() for f in d.glob("*.safetensors")),
               "methods": {}}
    print(f"machine: {results['machine']}, load average {os.getloadavg()}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        for method in a.methods:
            cfg = write_yaml(a.root / f"{method}.yml", dirs, method)
            row = {}
            outs = {"mergekit": a.root / f"out-mergekit-{method}", "pykernels": a.root / f"out-pykernels-{method}"}
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            runs = [("pykernels", [sys.executable, "-m", "pykernels", "merge", str(cfg), "--out",
                                   str(outs["pykernels"]), "--no-progress", *a.pykernels_args.split()])]
            if not a.skip_mergekit:
                mk = shutil.which("mergekit-yaml")
                runs.insert(0, ("mergekit", [mk, str(cfg), str(outs["mergekit"]), "--lazy-unpickle", "--quiet",
                                             "--no-write-model-card"]))
            for tool, cmd in runs:
                warm(dirs)
                r = timed(cmd, env)
                print(f"{method:10s} {tool:9s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB"
                      f"  rc {r['returncode']}", flush=True)
                if r["returncode"] != 0:
                    print(r["output_tail"], flush=True)
                row[tool] = r
            if "mergekit" in row and row["mergekit"]["returncode"] == 0 and row["pykernels"]["returncode"] == 0:
                row["speedup"] = row["mergekit"]["seconds"] / row["pykernels"]["seconds"]
                row["rss_ratio"] = row["pykernels"]["peak_rss_bytes"] / row["mergekit"]["peak_rss_bytes"]
                print(f"{method:10s} speed-up {row['speedup']:.1f}x, peak RSS pykernels / mergekit "
                      f"{row['rss_ratio']:.2f}", flush=True)
                if method == "ties":
                    row["agreement"] = compare_ties(dirs["base"], [dirs[f"ft{m}"] for m in range(3)],
                                                    outs["mergekit"], outs["pykernels"])
                    if a.mergekit_fp32:
                        cfg32 = write_yaml(a.root / f"{method}-fp32.yml", dirs, method, "float32")
                        out32 = a.root / f"out-mergekit-fp32-{method}"
                        shutil.rmtree(out32, ignore_errors=True)
                        warm(dirs)
                        r = timed([shutil.which("mergekit-yaml"), str(cfg32), str(out32), "--lazy-unpickle", "--quiet",
                                   "--no-write-model-card"], env)
                        print(f"{method:10s} mergekit (dtype float32) {r['seconds']:8.1f} s  peak RSS "
                              f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB  rc {r['returncode']}", flush=True)
                        row["mergekit_fp32"] = r
                        if r["returncode"] == 0:
                            row["agreement_fp32"] = compare_ties(dirs["base"], [dirs[f"ft{m}"] for m in range(3)],
                                                                 out32, outs["pykernels"])
                            print(f"{method:10s} vs mergekit fp32: {json.dumps(row['agreement_fp32'])}", flush=True)
                        if not a.keep:
                            shutil.rmtree(out32, ignore_errors=True)
                else:
                    row["keep_stats"] = {tool: keep_stats(dirs["base"], outs[tool]) for tool in outs}
                print(f"{method:10s} " + json.dumps(row.get("agreement") or row.get("keep_stats")), flush=True)
            if (outs["pykernels"] / "merge_report.json").exists():
                rep = json.loads((outs["pykernels"] / "merge_report.json").read_text())
                row["pykernels_report_totals"] = rep["totals"]
            for r in row.values():
                if isinstance(r, dict):
                    r.pop("output_tail", None) if r.get("returncode") == 0 else None
            results["methods"][method] = row
            if not a.keep:
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        results["load_average_at_end"] = os.getloadavg()
        if not a.keep:
            shutil.rmtree(inputs, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
