"""`pykernels merge`: end to end on small synthetic Llama-shaped checkpoints written here (several shards, bf16 and
fp32): every method equals pykernels.merging.merge applied tensor by tensor, bad configs fail before any work,
interrupted runs leave no checkpoint, --nproc 2 writes the same bytes as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")
yaml = pytest.importorskip("yaml")

from pykernels import cli, merge_command, merge_model  # noqa: E402
from pykernels.merging import merge  # noqa: E402
from pykernels.merge_command import tensor_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, INTER, VOCAB, KV = 2, 64, 128, 128, 32
WEIGHTS = [1.0, 0.5, 0.7]
DENSITIES = [0.5, 0.3, 0.7]
GAMMAS = [0.01, 0.05, 0.0]
EPSILONS = [0.1, 0.2, 0.15]


def llama_shapes(vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def write_checkpoint(d: Path, tensors: dict, shards: int, extra_files=()) -> Path:
    """With safetensors' own save_file: shards > 1 writes an index json."""
    d.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        safetensors_torch.save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        per, weight_map = -(-len(names) // shards), {}
        for s in range(shards):
            f = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            safetensors_torch.save_file(part, str(d / f), metadata={"format": "pt"})
            weight_map.update({n: f for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "num_hidden_layers": LAYERS, "torch_dtype": "float32",
                                               "vocab_size": tensors["model.embed_tokens.weight"].shape[0]}))
    for f in extra_files:
        (d / f).write_text(json.dumps({"file": f}))
    return d


def make_family(root: Path, dtype: torch.dtype, seed: int = 0, vocab_of=None) -> dict[str, Path]:
    """base (3 shards, tokenizer files) + ft0 (one file) + ft1, ft2 (2 shards): base + small continuous noise."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in llama_shapes().items()}
    paths = {"base": write_checkpoint(root / "base", {n: t.to(dtype) for n, t in base.items()}, 3,
                                      ("tokenizer.json", "tokenizer_config.json", "generation_config.json"))}
    for m in range(3):
        ft = {n: (t + 0.002 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
        paths[f"ft{m}"] = write_checkpoint(root / f"ft{m}", ft, 1 if m == 0 else 2)
    return paths


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"bfloat16": make_family(root / "bf16", torch.bfloat16),
            "float32": make_family(root / "fp32", torch.float32, seed=1)}


def load(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(f)))
    return out


PER_MODEL = {  # method -> per-model parameter lists (YAML names)
    "linear": {"weight": WEIGHTS},
    "task_arithmetic": {"weight": WEIGHTS},
    "ties": {"weight": WEIGHTS, "density": DENSITIES},
    "dare_ties": {"weight": WEIGHTS, "density": DENSITIES},
    "dare_linear": {"weight": WEIGHTS, "density": DENSITIES},
    "breadcrumbs": {"weight": WEIGHTS, "density": DENSITIES, "gamma": GAMMAS},
    "breadcrumbs_ties": {"weight": WEIGHTS, "density": DENSITIES, "gamma": GAMMAS},
    "della": {"weight": WEIGHTS, "density": DENSITIES, "epsilon": EPSILONS},
    "della_linear": {"weight": WEIGHTS, "density": DENSITIES, "epsilon": EPSILONS},
    "sce": {},
}
GLOBAL = {"task_arithmetic": {"lambda": 0.9}, "sce": {"select_topk": 0.4}, "dare_linear": {"rescale": False}}


def write_config(path: Path, fam: dict, method: str, per_model=None, global_params=None, **extra) -> Path:
    per_model = PER_MODEL[method] if per_model is None else per_model
    models = [] if method == "linear" else [{"model": str(fam["base"])}]
    for m in range(3):
        params = {k: v[m] for k, v in per_model.items()}
        models.append({"model": str(fam[f"ft{m}"]), **({"parameters": params} if params else {})})
    cfg = {"models": models, "merge_method": method, **extra}
    if method != "linear":
        cfg["base_model"] = str(fam["base"])
    gp = GLOBAL.get(method, {}) if global_params is None else global_params
    if gp:
        cfg["parameters"] = gp
    path.write_text(yaml.safe_dump(cfg))
    return path


def expected_kwargs(method: str) -> dict:
    """The merge() arguments mergekit's semantics give the YAML above (DESIGN.md section 3)."""
    p = PER_MODEL[method]
    if method == "sce":
        return {"densities": 0.4}
    kw = {"weights": WEIGHTS}
    if method == "task_arithmetic":
        kw["lambda_"] = 0.9
    if "density" in p:
        kw["densities"] = DENSITIES
    if "gamma" in p:
        kw.update(gammas=GAMMAS, k_rule="floor")
    if "epsilon" in p:
        kw["epsilons"] = EPSILONS
    if method == "ties":
        kw["k_rule"] = "at_least_one"
    if method == "dare_linear":
        kw["rescale"] = False
    return kw


def run_merge(config: Path, out: Path, *extra) -> int:
    return cli.main(["merge", str(config), "--out", str(out), "--no-progress", *extra])


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.pykernels-")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", list(PER_MODEL))
def test_every_method_equals_merge_per_tensor(families, tmp_path, method, dtype):
    fam = families[dtype]
    out = tmp_path / "out"
    assert run_merge(write_config(tmp_path / "c.yml", fam, method), out, "--seed", "7") == 0
    got = load(out)
    base = load(fam["base"])
    models = [load(fam[f"ft{m}"]) for m in range(3)]
    assert list(got) == list(base) or set(got) == set(base)
    kw = expected_kwargs(method)
    for name, b in base.items():
        ts = [m[name] for m in models]
        want = merge(None if method == "linear" else b, ts, method, seed=tensor_seed(7, name), **kw)
        assert got[name].dtype == want.dtype == getattr(torch, dtype), name
        assert torch.equal(got[name], want), (method, name)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["totals"]["tensors"] == len(base)
    if method != "linear":
        assert all(0 <= e["changed"] <= 1 for e in report["tensors"].values())


def test_layout_side_files_and_report(families, tmp_path):
    fam = families["bfloat16"]
    out = tmp_path / "out"
    assert run_merge(write_config(tmp_path / "c.yml", fam, "ties"), out, "--shard-size", "40KB",
                     "--dtype", "float32") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:  # every shard readable by safetensors, every tensor where the index says
        assert all(index["weight_map"][n] == f for n in safetensors_torch.load_file(str(out / f)))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load(out).values())
    assert all(t.dtype == torch.float32 for t in load(out).values())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_text() == (fam["base"] / f).read_text()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    report = json.loads((out / "merge_report.json").read_text())
    entry = report["tensors"]["model.layers.0.mlp.up_proj.weight"]
    numel = INTER * HIDDEN
    assert entry["kept"] == [max(1, int(rho * numel)) / numel for rho in DENSITIES]
    assert entry["parameters"]["densities"] == DENSITIES and entry["seconds"] >= 0
    assert report["totals"]["bytes_written"] == index["metadata"]["total_size"]
    assert report["totals"]["shards"] == len(files) and "definitions" in report
    assert leftovers(out) == []


def test_filters_gradients_and_precedence(families, tmp_path):
    """mergekit's resolution: per-model over global, filters by substring (first match), gradients over layers
    (t = layer / (layers - 1); t = 0 for tensors outside the layers)."""
    fam = families["float32"]
    per_model = {"weight": [[{"filter": "mlp", "value": 2.0}, {"value": 1.0}], 0.5, 0.7],
                 "density": [[0.2, 0.8], 0.3, 0.7]}
    cfg = write_config(tmp_path / "c.yml", fam, "ties", per_model=per_model,
                       global_params={"density": 0.9, "normalize": False})
    raw = yaml.safe_load(cfg.read_text())
    del raw["models"][2]["parameters"]["density"]  # ft1 falls back to the global density
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert run_merge(cfg, out) == 0
    got, base = load(out), load(fam["base"])
    models = [load(fam[f"ft{m}"]) for m in range(3)]
    for name, b in base.items():
        layer = 1.0 if ".layers.1." in name else 0.0
        w0 = 2.0 if "mlp" in name else 1.0
        rho0 = 0.2 + 0.6 * layer
        want = merge(b, [m[name] for m in models], "ties", weights=[w0, 0.5, 0.7], densities=[rho0, 0.9, 0.7],
                     normalize=False, k_rule="at_least_one")
        assert torch.equal(got[name], want), name


def test_dry_run_writes_nothing(families, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_merge(write_config(tmp_path / "c.yml", families["bfloat16"], "dare_ties"), out, "--dry-run",
                     "--nproc", "2") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]
    text = capsys.readouterr().out
    assert "dare_ties" in text and "rank 1" in text and "nothing written" in text


def test_global_density_equals_merge_model(families, tmp_path):
    fam = families["float32"]
    out = tmp_path / "out"
    assert run_merge(write_config(tmp_path / "c.yml", fam, "ties"), out, "--global-density") == 0
    base = load(fam["base"])
    models = [load(fam[f"ft{m}"]) for m in range(3)]
    want = merge_model(base, models, "ties", global_density=True, weights=WEIGHTS, densities=DENSITIES,
                       k_rule="at_least_one")
    got = load(out)
    assert all(torch.equal(got[n], want[n]) for n in base)
    # a model-wide threshold is not the per-tensor one
    per_tensor = merge_model(base, models, "ties", weights=WEIGHTS, densities=DENSITIES, k_rule="at_least_one")
    assert any(not torch.equal(got[n], per_tensor[n]) for n in base)


def test_global_density_dare_rescales_by_whole_model_norms(families, tmp_path):
    """dare_linear, one model, weight 1, fp32: out - base = s * kept(d) with one s for the whole model,
    s = sum|d| / sum|kept d| over every tensor."""
    fam = families["float32"]
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"models": [{"model": str(fam["ft0"]), "parameters": {"weight": 1.0,
                                                                                       "density": 0.4}}],
                                   "base_model": str(fam["base"]), "merge_method": "dare_linear"}))
    out = tmp_path / "out"
    assert run_merge(cfg, out, "--global-density") == 0
    got, base, ft = load(out), load(fam["base"]), load(fam["ft0"])
    total = kept_total = 0.0
    ratios = []
    for n, b in base.items():
        d = ft[n].double() - b.double()
        kept = (got[n] != b)
        total += d.abs().sum().item()
        kept_total += d[kept].abs().sum().item()
        ratios.append(((got[n].double() - b.double())[kept] / d[kept]).median().item())
    s = total / kept_total
    assert all(abs(r - s) < 1e-4 * s for r in ratios), (s, ratios[:4])


def test_embed_slice(families, tmp_path):
    """A fine-tuned model with a larger vocabulary: an error naming the tensor, or with --embed-slice the first
    min(vocab) rows of every model (mergekit's vocabulary truncation)."""
    fam = dict(families["float32"])
    big = load(fam["ft2"])
    g = torch.Generator().manual_seed(5)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        big[n] = torch.cat([big[n], torch.randn(8, HIDDEN, generator=g)])
    fam["ft2"] = write_checkpoint(tmp_path / "big", big, 2)
    cfg = write_config(tmp_path / "c.yml", fam, "ties")
    out = tmp_path / "out"
    assert run_merge(cfg, out) == 2
    assert not out.exists()
    assert run_merge(cfg, out, "--embed-slice") == 0
    got, base = load(out), load(fam["base"])
    models = [load(fam["ft0"]), load(fam["ft1"]), big]
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        want = merge(base[n], [m[n][:VOCAB] for m in models], "ties", weights=WEIGHTS, densities=DENSITIES,
                     k_rule="at_least_one")
        assert torch.equal(got[n], want), n


def _mutate(tmp_path: Path, fam: dict, method: str = "ties", edit=None) -> Path:
    cfg = write_config(tmp_path / "c.yml", fam, method)
    raw = yaml.safe_load(cfg.read_text())
    if edit is not None:
        edit(raw)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _set(path, value):
    def edit(raw):
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        node[path[-1]] = value
    return edit


BAD = {
    "unknown method": (_set(["merge_method"], "frankenmerge"), "unknown merge_method 'frankenmerge'"),
    "mergekit-only method": (_set(["merge_method"], "slerp"), "does not implement"),
    "unknown global parameter": (_set(["parameters", "densty"], 0.5), "unknown parameter 'densty'"),
    "unknown model parameter": (_set(["models", 1, "parameters", "gamma"], 0.1), "unknown parameter 'gamma'"),
    "shared parameter per model": (_set(["models", 1, "parameters", "normalize"], True), "shared parameter"),
    "density above 1": (_set(["models", 2, "parameters", "density"], 1.5), "density = 1.5 must lie in [0, 1]"),
    "density not a number": (_set(["models", 2, "parameters", "density"], "lots"), "must be a number"),
    "weight missing": (lambda raw: raw["models"][3]["parameters"].pop("weight"), "'weight' is required"),
    "weight infinite": (_set(["models", 1, "parameters", "weight"], float("inf")), "must be finite"),
    "missing model dir": (_set(["models", 2, "model"], "/nonexistent/ft"), "/nonexistent/ft does not exist"),
    "no base": (lambda raw: raw.pop("base_model"), "needs base_model"),
    "unknown top-level key": (_set(["merge_methods"], "ties"), "unknown key 'merge_methods'"),
    "slices": (_set(["slices"], [{"sources": []}]), "'slices:' configs are not supported"),
    "tokenizer union": (_set(["tokenizer_source"], "union"), "'union' is not supported"),
    "bad dtype": (_set(["dtype"], "float8"), "dtype must be one of"),
    "normalize not bool": (_set(["parameters", "normalize"], "maybe"), "must be true or false"),
    "duplicate model": (lambda raw: raw["models"].append(dict(raw["models"][1])), "listed twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_before_any_work(families, tmp_path, monkeypatch, capsys, case):
    edit, message = BAD[case]
    cfg = _mutate(tmp_path, families["bfloat16"], edit=edit)
    monkeypatch.setattr(merge_command, "execute", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    assert run_merge(cfg, out) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and leftovers(out) == []


def test_bad_checkpoints_fail_before_any_work(families, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(merge_command, "execute", lambda *a, **k: pytest.fail("work started"))
    fam = dict(families["bfloat16"])
    out = tmp_path / "out"
    # a shard listed in the index is missing
    broken = tmp_path / "broken"
    shutil.copytree(fam["ft1"], broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    assert run_merge(write_config(tmp_path / "c.yml", dict(fam, ft1=broken), "ties"), out) == 2
    assert "model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing" in \
        capsys.readouterr().err
    # a truncated shard
    shutil.rmtree(broken)
    shutil.copytree(fam["ft1"], broken)
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert run_merge(write_config(tmp_path / "c.yml", dict(fam, ft1=broken), "ties"), out) == 2
    assert "is truncated" in capsys.readouterr().err
    # a tensor missing in one model
    tensors = load(fam["ft2"])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    lacking = write_checkpoint(tmp_path / "lacking", tensors, 1)
    assert run_merge(write_config(tmp_path / "c.yml", dict(fam, ft2=lacking), "ties"), out) == 2
    assert "models[3] (" in (err := capsys.readouterr().err) and "lacks tensor 'model.layers.1.mlp.up_proj.weight'" \
        in err
    # a shape mismatch outside the vocabulary tensors
    tensors = load(fam["ft2"])
    tensors["model.norm.weight"] = torch.zeros(HIDDEN + 1, dtype=torch.bfloat16)
    odd = write_checkpoint(tmp_path / "odd", tensors, 1)
    assert run_merge(write_config(tmp_path / "c.yml", dict(fam, ft2=odd), "ties"), out) == 2
    assert "tensor 'model.norm.weight' has different shapes" in capsys.readouterr().err
    # pytorch_model.bin only
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "pytorch_model.bin").write_bytes(b"x")
    assert run_merge(write_config(tmp_path / "c.yml", dict(fam, ft0=binonly), "ties"), out) == 2
    assert "only safetensors checkpoints are supported" in capsys.readouterr().err
    # output exists
    out.mkdir()
    assert run_merge(write_config(tmp_path / "c.yml", fam, "ties"), out) == 2
    assert "already exists; remove it or pass --overwrite" in capsys.readouterr().err
    assert leftovers(out) == []


def test_overwrite_and_failure_cleanup(families, tmp_path, monkeypatch, capsys):
    fam = families["bfloat16"]
    cfg = write_config(tmp_path / "c.yml", fam, "ties")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setenv(merge_command.HOOK_ENV, "raise_after:3")
    assert run_merge(cfg, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "failing on purpose" in err and "removed the temporary directory" in err
    assert (out / "old.txt").exists() and leftovers(out) == []  # the old output is untouched
    monkeypatch.delenv(merge_command.HOOK_ENV)
    assert run_merge(cfg, out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "merge_report.json").exists() and leftovers(out) == []


def test_tensor_seed_depends_on_name_only():
    assert tensor_seed(0, "a.weight") == tensor_seed(0, "a.weight")
    assert len({tensor_seed(0, "a"), tensor_seed(0, "b"), tensor_seed(1, "a")}) == 3
    assert 0 <= tensor_seed(2**62, "x") < 2**63


def test_split_jobs_contiguous_and_balanced():
    jobs = [merge_command.Job(str(i), (n,), torch.float32, True, None, {}, 0, 4 * n, 4 * n, n)
            for i, n in enumerate([10, 1000, 10, 10, 500, 500, 10])]
    for world in (1, 2, 3, 5, 9):
        ranges = merge_command.split_jobs(jobs, world)
        assert len(ranges) == world
        assert [i for r in ranges for i in r] == list(range(len(jobs)))


# --- subprocesses: python -m pykernels merge, --nproc 2, signals ---------------------------------------------------

def _cmd(config: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pykernels", "merge", str(config), "--out", str(out), "--no-progress", *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "merge_report.json"}


def _torchrun() -> list[str] | None:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else None


@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
def test_two_processes_bit_identical(families, tmp_path, launcher):
    """--nproc 2 (ties, model-wide thresholds from all-reduced histograms) and torchrun --nproc-per-node 2
    (dare_ties: name-seeded masks, whole-model l1 norms gathered in tensor order): the same bytes as one process,
    shard for shard."""
    method = "ties" if launcher == "nproc" else "dare_ties"
    fam = families["bfloat16"]
    cfg = write_config(tmp_path / "c.yml", fam, method)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--shard-size", "60KB", "--global-density", "--seed", "3"]
    assert run_merge(cfg, one, *args) == 0
    if launcher == "nproc":
        cmd = _cmd(cfg, two, *args, "--nproc", "2")
    else:
        if _torchrun() is None:
            pytest.skip("torchrun is not installed next to this python")
        cmd = _torchrun() + ["--standalone", "--nproc-per-node", "2", "-m", "pykernels", "merge", str(cfg),
                             "--out", str(two), "--no-progress", *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    a, b = _files(one), _files(two)
    assert list(a) == list(b) and len(a) > 3
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    report = json.loads((two / "merge_report.json").read_text())
    assert report["options"]["processes"] == 2 and len(report["tensors"]) == len(load(fam["base"]))
    assert leftovers(two) == []


def _start_and_wait_for_hook(cfg: Path, out: Path, *extra):
    proc = subprocess.Popen(_cmd(cfg, out, *extra), env=_env(**{merge_command.HOOK_ENV: "sleep_after:2:60"}),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "sleeping after" in line:
            return proc, lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the test hook never fired: " + "".join(lines))


def test_sigterm_leaves_no_checkpoint(families, tmp_path):
    cfg = write_config(tmp_path / "c.yml", families["bfloat16"], "ties")
    out = tmp_path / "out"
    proc, _ = _start_and_wait_for_hook(cfg, out, "--shard-size", "60KB")
    assert len(leftovers(out)) == 1  # the temporary directory, half written
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 143, err
    assert "interrupted (SIGTERM)" in err and "removed the temporary directory" in err
    assert not out.exists() and leftovers(out) == []


def test_sigkill_leaves_no_output_and_next_run_cleans_up(families, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yml", families["bfloat16"], "ties")
    out = tmp_path / "out"
    proc, _ = _start_and_wait_for_hook(cfg, out)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    assert not out.exists() and len(leftovers(out)) == 1
    assert run_merge(cfg, out) == 0
    assert "left behind by an earlier run that was killed" in capsys.readouterr().err
    assert out.exists() and leftovers(out) == []
