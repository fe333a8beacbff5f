"""`pykernels` console script: bench (the main job), check (every kernel against its reference) and merge
(merge checkpoints from a mergekit-style YAML config: pykernels.merge_command)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date

import torch


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today().isoformat()}"


def bench(args) -> int:
    from . import benchmarking as b

    progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    print(f"machine: {_machine()}")
    results = {"machine": _machine()}
    if args.family in ("merging", "all"):
        shape = b.SIZES[args.size]
        print(f"pykernels bench: merging, N=3 models + base, shape {shape}, density 0.2, {args.threads} threads")
        rows = b.merging_table(shape=shape, threads=args.threads, repeats=args.repeats, only=args.only,
                               progress=progress)
        print(b.format_merging_table(rows))
        results["merging"] = rows
    if args.family in ("selection", "all"):
        print(f"pykernels bench: order statistics, fp32, {args.threads} threads")
        rows = b.selection_table(args.size, threads=args.threads, repeats=args.repeats, progress=progress)
        print(b.format_selection_table(rows))
        results["selection"] = rows
        if args.size == "default":
            stream = b.measure_streaming_in_subprocess(22, args.threads)
            print(f"StreamingThreshold over a synthetic {stream.get('parameters', 0) / 1e9:.2f}B-parameter model "
                  f"streamed tensor by tensor: {stream}")
            results["streaming"] = stream
    if args.family in ("attention", "all"):
        print(f"pykernels bench: PBS-Attn, B=1 Hq=8 Hkv=2 D=128, block 128 segment 256, {args.threads} threads")
        rows = b.attention_table(args.size, threads=args.threads, repeats=args.repeats, progress=progress)
        print(b.format_attention_table(rows))
        results["attention"] = rows
    if args.family in ("moe", "all"):
        print(f"pykernels bench: MoE routing (fp32 logits, bf16 rows of {b.MOE_HIDDEN}), {args.threads} threads")
        rows = b.moe_table(args.size, threads=args.threads, repeats=args.repeats, progress=progress)
        print(b.format_moe_table(rows))
        results["moe"] = rows
    if args.plot:
        plot_speedups(results, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def plot_speedups(results: dict, path: str) -> None:
    """One panel per benchmarked family: pykernels' speed-up over each comparator, per table row (log scale)."""
    from .benchmarking import speedup_series

    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(family, *speedup_series(family, results[family]))
              for family in ("merging", "selection", "attention", "moe") if results.get(family)]
    if not panels:
        raise SystemExit("--plot: no benchmark rows to draw")
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6, max(len(p[1]) for p in panels) * 0.8), 3.6 * len(panels)))
    for ax, (family, labels, series) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(series))
        for i, (name, ratios) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(labels))], [r or 0 for r in ratios], width, label=name)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(family)
        ax.set_ylabel("speed-up of pykernels (x)")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _check_cases(base, tensors):
    """name -> fn(backend) for every public kernel, on small random inputs."""
    import pykernels as pk
    from .benchmarking import SPARSE_METHODS

    cases = {}
    for method in pk.METHODS:
        kw = {"densities": 0.3} if method in SPARSE_METHODS or method == "sce" else {}
        b = None if method == "linear" else base
        cases[f"merging.{method}"] = lambda be, m=method, b=b, kw=kw: pk.merge(b, tensors, m, backend=be, **kw)
    x = tensors[0]
    cases.update({
        "selection.kth_largest": lambda be: pk.kth_largest(x, 1000, backend=be),
        "selection.kth_largest(dim)": lambda be: pk.kth_largest(x, 7, dim=1, abs=True, backend=be),
        "selection.quantile": lambda be: pk.quantile(x, [0.1, 0.5, 0.9], backend=be),
        "selection.topk_mask": lambda be: pk.topk_mask(x, 500, backend=be),
        "selection.topk_mask(dim)": lambda be: pk.topk_mask(x, 5, dim=0, backend=be),
        "selection.rank": lambda be: pk.rank(x, dim=-1, backend=be),
        "statistics.median": lambda be: pk.median(tensors, base=base, backend=be),
        "statistics.trimmed_mean": lambda be: pk.trimmed_mean(tensors + [base], 0.2, backend=be),
        "statistics.sign_count": lambda be: pk.sign_count(tensors, base=base, backend=be),
    })
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 300, 64, generator=g) for h in (4, 2, 2))
    cases.update({
        "attention.pbs_attention": lambda be: pk.pbs_attention(q, k, v, block_size=32, segment_size=64, backend=be),
        "attention.pbs_plan.perm": lambda be: pk.pbs_plan(q, k, block_size=32, segment_size=64, backend=be).perm,
        "attention.pbs_plan.blocks": lambda be: pk.pbs_plan(q, k, block_size=32, segment_size=64,
                                                            backend=be).block_mask(),
    })
    logits, rows = torch.randn(300, 64, generator=g), torch.randn(300, 48, generator=g)
    bias = 0.1 * torch.randn(64, generator=g)
    weights, ids = pk.topk_route(logits, 6, backend="reference")
    grouped = dict(k=8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4, scaling=2.5)
    cases.update({
        "moe.topk_route.weights": lambda be: pk.topk_route(logits, 6, backend=be)[0],
        "moe.topk_route.ids": lambda be: pk.topk_route(logits, 6, backend=be)[1],
        "moe.topk_route(grouped).ids": lambda be: pk.topk_route(logits, backend=be, **grouped)[1],
        "moe.align_block_size": lambda be: pk.align_block_size(ids, 64, 16, backend=be)[0],
        "moe.permute": lambda be: pk.permute(rows, ids, 64, weights=weights, capacity_factor=1.0, backend=be).perm,
        "moe.unpermute": lambda be: pk.unpermute(rows.repeat_interleave(6, 0), torch.arange(1800), weights,
                                                 backend=be),
    })
    return cases


def check(args) -> int:
    """Every kernel of every available CPU backend against the reference, on small random inputs."""
    from . import _backend

    backends = [b for b in ("cpp", "triton") if _backend._unavailable(b, torch.device("cpu")) is None]
    failures = total = 0
    g = torch.Generator().manual_seed(0)
    base = torch.randn(257, 31, generator=g)
    tensors = [base + 0.1 * torch.randn(257, 31, generator=g) for _ in range(3)]
    for name, run in _check_cases(base, tensors).items():
        want = run("reference")
        for backend in backends:
            got = run(backend)
            ok = got.dtype == want.dtype and (torch.equal(got, want) if not got.is_floating_point()
                                              else torch.allclose(got, want, atol=1e-5, rtol=1e-5))
            failures += not ok
            total += 1
            print(f"{'ok  ' if ok else 'FAIL'} {name:28s} {backend}")
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def add_merge_arguments(p) -> None:
    from .merge_command import add_arguments

    add_arguments(p)


def merge(args) -> int:
    from .merge_command import run

    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="run the benchmark suite (each kernel vs reference vs peers vs floor)")
    p.add_argument("--family", default="all", choices=["merging", "selection", "attention", "moe", "all"])
    p.add_argument("--size", default="default", choices=["default", "small", "tiny"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="+", help="run only these implementations (e.g. floor pykernels)")
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--plot", help="also draw the speed-ups as a PNG chart")
    p.set_defaults(run=bench)
    p = sub.add_parser("check", help="check every kernel against its reference on this machine")
    p.set_defaults(run=check)
    p = sub.add_parser("merge", help="merge local safetensors checkpoints from a mergekit-style YAML config")
    add_merge_arguments(p)
    p.set_defaults(run=merge)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
