"""`pykernels merge CONFIG.yml --out DIR`: merge local safetensors checkpoints from a mergekit-style YAML config.

Stages (DESIGN.md section 7):

1. `load_config`: the YAML (mergekit 0.1.5's schema: `models` with per-model `parameters`, `base_model`,
   `merge_method`, global `parameters`, `dtype`, `out_dtype`, `tokenizer_source` / `tokenizer.source`).
2. `build_plan`: every check that can fail, before any work: missing files and shards, unknown methods and
   parameters, values out of range, tensors missing in some models, shape mismatches (mergekit's
   vocabulary truncation rule with `--embed-slice`), an existing output directory. Parameters are resolved per
   tensor with mergekit's precedence (the model's own, then the global ones, then the method's default;
   filters and layer gradients as in mergekit) into the arguments of `pykernels.merging.merge`.
3. `execute`: with `--global-density` first the model-wide selection (StreamingThreshold histograms, all-reduced
   across processes; or whole-model l1 norms for DARE), then tensor by tensor: load the inputs lazily, merge,
   write the output straight into its place in the shard files, release the inputs' pages. Everything goes to a
   temporary directory beside --out that is renamed into place at the very end; a failure, Ctrl-C or SIGTERM
   removes it.

Processes: `--nproc N` (or `torchrun --nproc-per-node N -m pykernels merge ...`) splits the tensor list into N
contiguous runs of about equal cost; each process writes its tensors into the shared shard files, whose layout
is fixed by the plan, and rank 0 writes the index, the report and the config files. Every tensor is computed
exactly as in one process (random masks are seeded by the tensor's name, `tensor_seed`; global thresholds come
from summed histograms; global l1 norms are summed in tensor order), so the output is bit-identical.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import Checkpoint, CheckpointError, ShardedWriter, parse_size, plan_shards
from .io.writer import tensor_bytes
from .model_merging import _progress, _task_vector, engine_thresholds
from .reference.merging import l1_ratio, tensor_seed

SUPPORTED = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear", "sce")
MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "passthrough", "model_stock", "karcher", "nearswap", "arcee_fusion",
                 "ram", "ramplus_tl")
GTA = SUPPORTED[1:9]  # mergekit's generalized task arithmetic methods
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MERGEABLE = (torch.float32, torch.bfloat16, torch.float16)
TOP_LEVEL_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
                  "tokenizer", "slices", "modules", "chat_template", "name"}
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
# Tensors with a vocabulary axis (axis 0), as in mergekit's architecture files.
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings|tok_embeddings|"
                          r"output)\.weight$")
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
REQUIRED = object()
HOOK_ENV = "PYKERNELS_MERGE_TEST_HOOK"  # tests only: "sleep_after:N" or "raise_after:N" (tensors written)
TMP_ENV = "PYKERNELS_MERGE_TMPDIR"  # set by the --nproc launcher for its workers
CHILD_ENV = "PYKERNELS_MERGE_WORKER"
CHANGED_SAMPLE = 1 << 16  # elements compared per tensor for the report's change fraction
CHANGED_CHUNKS = 16
STOP_GRACE = 20.0  # seconds the --nproc launcher waits for stopped workers before SIGKILL


class MergeConfigError(ValueError):
    """A config, checkpoint or option that cannot be merged; raised before any work starts."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) during a merge."""


# --- the method's parameters (mergekit 0.1.5's ParameterSpecs) --------------------------------------------

def _spec(method: str) -> tuple[dict, dict]:
    """(shared, per_model): parameter name -> (kind, default) with kind 'float' or 'bool'."""
    from .merging import METHODS

    if method == "linear":
        return {"normalize": ("bool", True)}, {"weight": ("float", REQUIRED)}
    if method == "sce":
        return {"int8_mask": ("bool", False), "select_topk": ("float", 1.0)}, {}
    preset = METHODS[method]
    shared = {"int8_mask": ("bool", False), "normalize": ("bool", preset.normalize),
              "rescale": ("bool", preset.rescale != "none"), "lambda": ("float", 1.0)}
    per_model = {"weight": ("float", REQUIRED), "density": ("float", 1.0)}
    if preset.sparsifier == "band":
        per_model["gamma"] = ("float", 0.01)
    if preset.sparsifier == "della":
        per_model["epsilon"] = ("float", 0.15)
    return shared, per_model


def _coerce(kind: str, value, where: str):
    """pydantic-style lax validation of one scalar (YAML leaves '1e-3' a string; mergekit accepts it)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise MergeConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise MergeConfigError(f"{where} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MergeConfigError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise MergeConfigError(f"{where} must be finite, got {value!r}")
    return out


def _check_setting(setting, where: str) -> None:
    """The structure of a ParameterSetting: a scalar, a gradient (list of scalars), {value, filter} or a list of
    those (mergekit's ConditionalParameter)."""
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, dict):
        extra = set(setting) - {"value", "filter"}
        if "value" not in setting or extra:
            raise MergeConfigError(f"{where}: a conditional setting has keys value and filter, got {sorted(setting)}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise MergeConfigError(f"{where}: filter must be a string, got {setting['filter']!r}")
        _check_setting(setting["value"], where)
        return
    if isinstance(setting, list):
        for s in setting:
            if isinstance(s, list):
                raise MergeConfigError(f"{where}: nested lists are not a valid setting")
            _check_setting(s, where)
        return
    raise MergeConfigError(f"{where}: unexpected setting {setting!r}")


def evaluate_setting(setting, tensor_name: str, t: float, kind: str, where: str):
    """mergekit's evaluate_setting: filters select by substring of the tensor name (first match wins, None / '*'
    match everything), numeric lists are gradients interpolated at t, other lists pick the entry at t. None when
    no filter matches (the next scope then decides)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _coerce(kind, setting, where)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_coerce(kind, e, where) for e in setting]
        if kind != "float":
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return _coerce(kind, (1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        if not isinstance(cond, dict):
            raise MergeConfigError(f"{where}: mix of plain values and {{value, filter}} entries")
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, kind, where)
    return None


# --- config -----------------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    index: int
    path: Path
    parameters: dict

    @property
    def label(self) -> str:
        return f"models[{self.index}] ({self.path})"


@dataclass
class MergeConfig:
    source: Path
    method: str
    models: list[ModelEntry]
    base: Path | None
    parameters: dict
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: Path | None
    raw: dict


def _model_path(ref, where: str, config_dir: Path) -> Path:
    if isinstance(ref, dict):
        inner = ref.get("model", ref)
        if isinstance(inner, dict):
            if inner.get("revision") not in (None, "main"):
                raise MergeConfigError(f"{where}: revision {inner['revision']!r}: only local directories are supported")
            inner = inner.get("path")
        if ref.get("lora") is not None:
            raise MergeConfigError(f"{where}: LoRA adapters are not supported by pykernels merge")
        ref = inner
    if not isinstance(ref, str) or not ref:
        raise MergeConfigError(f"{where}: expected a local checkpoint directory, got {ref!r}")
    if "+" in ref and not Path(ref).exists():
        raise MergeConfigError(f"{where}: {ref!r} looks like mergekit's model+lora syntax; LoRA adapters are not "
                               f"supported by pykernels merge")
    p = Path(ref).expanduser()
    if not p.is_absolute() and not p.exists() and (config_dir / p).exists():
        p = config_dir / p  # relative to the config file when not found relative to the working directory
    return p


def _dtype(name, where: str) -> torch.dtype | None:
    if name is None:
        return None
    name = str(name)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name in DTYPES:
        return DTYPES[name]
    if name == "float64":
        raise MergeConfigError(f"{where}: float64 is not supported (pykernels merges in float32 and writes float32, "
                               f"bfloat16 or float16)")
    raise MergeConfigError(f"{where} must be one of {tuple(DTYPES)}, got {name!r}")


def load_config(path) -> MergeConfig:
    """Parse and check the structure of a mergekit-style YAML config (no checkpoint is opened here)."""
    path = Path(path)
    if not path.is_file():
        raise MergeConfigError(f"config file {path} does not exist")
    try:
        import yaml
    except ImportError as e:  # pragma: no cover
        raise MergeConfigError("pykernels merge needs PyYAML (pip install pyyaml)") from e
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise MergeConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    for key in ("slices", "modules"):
        if raw.get(key):
            raise MergeConfigError(f"{path}: '{key}:' configs are not supported by pykernels merge; list the models "
                                   f"under 'models:'")
    if raw.get("chat_template") is not None:
        raise MergeConfigError(f"{path}: chat_template is not supported by pykernels merge (the tokenizer files "
                               f"are copied as they are); leave it out")
    method = raw.get("merge_method")
    if method is None:
        raise MergeConfigError(f"{path}: merge_method is missing")
    if method not in SUPPORTED:
        extra = " (a mergekit method pykernels merge does not implement)" if method in MERGEKIT_ONLY else ""
        raise MergeConfigError(f"{path}: unknown merge_method {method!r}{extra}; supported: {', '.join(SUPPORTED)}")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeConfigError(f"{path}: 'models:' must be a non-empty list of {{model: PATH, parameters: ...}}")
    config_dir = path.parent
    models = []
    for i, entry in enumerate(models_raw):
        where = f"{path}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"{where}: expected {{model: PATH, parameters: ...}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"{where}: unknown key {extra[0]!r} (a model entry has model and parameters)")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeConfigError(f"{where}: parameters must be a mapping, got {params!r}")
        models.append(ModelEntry(i, _model_path(entry["model"], where, config_dir), params))
    base = _model_path(raw["base_model"], f"{path}: base_model", config_dir) if raw.get("base_model") else None
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"{path}: parameters must be a mapping, got {params!r}")
    tokenizer_source = raw.get("tokenizer_source")
    tok = raw.get("tokenizer")
    if tok is not None:
        if tokenizer_source is not None:
            raise MergeConfigError(f"{path}: give tokenizer_source or tokenizer, not both")
        if not isinstance(tok, dict) or set(tok) - {"source"}:
            raise MergeConfigError(f"{path}: tokenizer: only 'source' is supported by pykernels merge (tokens and "
                                   f"pad_to_multiple_of need vocabulary surgery)")
        tokenizer_source = tok.get("source")
    if tokenizer_source in (None, "base"):
        tok_path = None
    elif tokenizer_source == "union":
        raise MergeConfigError(f"{path}: tokenizer_source 'union' is not supported by pykernels merge (it needs "
                               f"vocabulary surgery); use 'base' or a model directory")
    else:
        tok_path = _model_path(tokenizer_source, f"{path}: tokenizer_source", config_dir)
    return MergeConfig(path, method, models, base, params, _dtype(raw.get("dtype"), f"{path}: dtype"),
                       _dtype(raw.get("out_dtype"), f"{path}: out_dtype"), tok_path, raw)


# --- the plan -----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool  # False: copied from the reference input (non-float tensors)
    rows: int | None  # narrow dim 0 of every input to this many rows (--embed-slice)
    kwargs: dict  # merge() arguments besides base, tensors, method, seed, out_dtype
    seed: int
    in_bytes: int
    out_bytes: int
    numel: int


@dataclass
class Plan:
    config: MergeConfig
    method: str
    base: Checkpoint | None  # the merge's base tensor source (None for linear)
    models: list[Checkpoint]  # the merged tensors' sources, in merge order
    model_labels: list[str]
    reference: Checkpoint  # tensor names, order and the copied config come from here
    jobs: list[Job]
    out: Path
    shard_size: int
    input_dtype: torch.dtype | None
    global_density: bool
    global_densities: list[float] | None = None
    global_gammas: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    vocab_rows: int | None = None
    config_dir: Path | None = None  # config.json / generation_config.json come from here
    tokenizer_dir: Path | None = None

    @property
    def shards(self):
        return plan_shards([(j.name, j.out_dtype, j.shape) for j in self.jobs], self.shard_size)


def _open(path: Path, label: str) -> Checkpoint:
    try:
        return Checkpoint(path, label)
    except CheckpointError as e:
        raise MergeConfigError(str(e)) from None


def _layer_t(names: list[str]) -> dict[str, float]:
    """mergekit's t per tensor: layer i of L gets i / (L - 1) (1 when L = 1), other tensors 0."""
    layers = {}
    for n in names:
        m = LAYER.search(n)
        if m:
            layers[n] = int(m.group(1))
    count = max(layers.values()) + 1 if layers else 0
    return {n: (layers[n] / (count - 1) if count > 1 else 1.0) if n in layers else 0.0 for n in names}


class _Resolver:
    """Per tensor, the method's parameters with mergekit's precedence and checks that name what is wrong."""

    def __init__(self, cfg: MergeConfig, method: str, merged: list[ModelEntry]):
        self.cfg, self.method, self.merged = cfg, method, merged
        self.shared_spec, self.model_spec = _spec(method)
        where = f"{cfg.source}: parameters"
        known = set(self.shared_spec) | set(self.model_spec)
        for name, setting in cfg.parameters.items():
            if name not in known:
                raise MergeConfigError(f"{where}: unknown parameter {name!r} for merge_method {method} "
                                       f"(known: {', '.join(sorted(known)) or 'none'})")
            _check_setting(setting, f"{where}.{name}")
        for entry in cfg.models:
            for name, setting in entry.parameters.items():
                w = f"{cfg.source}: {entry.label}.parameters"
                if name in self.shared_spec:
                    raise MergeConfigError(f"{w}: {name!r} is a shared parameter of {method}; set it under the "
                                           f"top-level 'parameters:'")
                if name not in self.model_spec:
                    known_m = ", ".join(sorted(self.model_spec)) or "none"
                    raise MergeConfigError(f"{w}: unknown parameter {name!r} for merge_method {method} "
                                           f"(per-model parameters: {known_m})")
                _check_setting(setting, f"{w}.{name}")

    def shared(self, tensor: str, t: float) -> dict:
        out = {}
        for name, (kind, default) in self.shared_spec.items():
            value = None
            if name in self.cfg.parameters:
                value = evaluate_setting(self.cfg.parameters[name], tensor, t, kind,
                                         f"{self.cfg.source}: parameters.{name}")
            out[name] = default if value is None else value
        return out

    def per_model(self, entry: ModelEntry, tensor: str, t: float) -> dict:
        out = {}
        for name, (kind, default) in self.model_spec.items():
            value = None
            for scope, where in ((entry.parameters, f"{entry.label}.parameters.{name}"),
                                 (self.cfg.parameters, f"parameters.{name}")):
                if name in scope:
                    value = evaluate_setting(scope[name], tensor, t, kind, f"{self.cfg.source}: {where}")
                    if value is not None:
                        break
            if value is None:
                if default is REQUIRED:
                    raise MergeConfigError(f"{self.cfg.source}: {entry.label}: parameter {name!r} is required by "
                                           f"{self.method} (tensor {tensor!r})")
                value = default
            out[name] = value
        self._check_ranges(entry, tensor, out)
        return out

    def _check_ranges(self, entry: ModelEntry, tensor: str, p: dict) -> None:
        where = f"{self.cfg.source}: {entry.label}"
        for name in ("density", "gamma"):
            if name in p and not 0.0 <= p[name] <= 1.0:
                raise MergeConfigError(f"{where}: {name} = {p[name]} must lie in [0, 1] (tensor {tensor!r})")
        if "epsilon" in p:
            eps, rho = p["epsilon"], p["density"]
            if eps < 0:
                raise MergeConfigError(f"{where}: epsilon = {eps} must be >= 0 (tensor {tensor!r})")
            if 0 < rho < 1 and not (rho - eps > 0 and rho + eps < 1):
                raise MergeConfigError(f"{where}: density {rho} +/- epsilon {eps} must lie in (0, 1) (tensor "
                                       f"{tensor!r})")

    def kwargs(self, tensor: str, t: float) -> dict:
        """The merge() keyword arguments for one tensor (besides seed and out_dtype)."""
        from .merging import METHODS

        shared = self.shared(tensor, t)
        if self.method == "sce":
            rho = shared["select_topk"]
            if not 0.0 <= rho <= 1.0:
                raise MergeConfigError(f"{self.cfg.source}: parameters.select_topk = {rho} must lie in [0, 1] "
                                       f"(tensor {tensor!r})")
            return {"densities": rho}
        per = [self.per_model(e, tensor, t) for e in self.merged]
        kw: dict[str, Any] = {"weights": [p["weight"] for p in per], "normalize": shared["normalize"]}
        if self.method == "linear":
            return kw
        sparsifier = METHODS[self.method].sparsifier
        kw["rescale"] = shared["rescale"]
        kw["lambda_"] = shared["lambda"]
        if sparsifier != "none":
            kw["densities"] = [p["density"] for p in per]
        if sparsifier == "band":
            kw["gammas"] = [p["gamma"] for p in per]
            kw["k_rule"] = "floor"  # mergekit's magnitude_outliers: target = int(density * numel)
        if sparsifier == "magnitude":
            kw["k_rule"] = "at_least_one"  # mergekit's magnitude: k = max(1, int(density * numel))
        if sparsifier == "della":
            kw["epsilons"] = [p["epsilon"] for p in per]
        return kw


def build_plan(args) -> Plan:
    """Every check, before any work: config, checkpoints, parameters, tensors, shapes, output directory."""
    cfg = load_config(args.config)
    method = cfg.method
    out = Path(args.out).expanduser().absolute()
    entries = cfg.models
    paths = [e.path.resolve() for e in entries]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    if dup is not None:
        raise MergeConfigError(f"{cfg.source}: model {dup} is listed twice")
    notes: list[str] = []
    base_path = cfg.base.resolve() if cfg.base is not None else None
    if method == "linear":
        merged = entries
        if cfg.base is not None and base_path not in paths:
            notes.append("linear averages the listed models; base_model only supplies config and tokenizer files")
    else:
        if cfg.base is None:
            raise MergeConfigError(f"{cfg.source}: merge_method {method} needs base_model")
        merged = [e for e, p in zip(entries, paths) if p != base_path]
        for e, p in zip(entries, paths):
            if p == base_path and e.parameters:
                notes.append(f"{e.label} is the base model: its parameters are ignored by {method}")
        if not merged:
            raise MergeConfigError(f"{cfg.source}: {method} needs at least one model besides the base model")
    from .merging import MAX_MODELS

    if len(merged) > MAX_MODELS:
        raise MergeConfigError(f"{cfg.source}: at most {MAX_MODELS} models can be merged, got {len(merged)}")
    for p, label in [(out, "--out")]:
        if p in paths or p == base_path:
            raise MergeConfigError(f"{label} {p} is one of the input models")
    if out.exists() and not args.overwrite:
        raise MergeConfigError(f"output directory {out} already exists; remove it or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise MergeConfigError(f"--out {out} exists and is not a directory")
    resolver = _Resolver(cfg, method, merged)

    base_ck = _open(cfg.base, "base_model") if cfg.base is not None and method != "linear" else None
    model_cks = [_open(e.path, e.label) for e in merged]
    reference = base_ck if base_ck is not None else model_cks[0]
    config_dir = _checkpoint_dir(cfg.base if cfg.base is not None else merged[0].path)
    if cfg.base is not None and method == "linear" and not cfg.base.exists():
        raise MergeConfigError(f"base_model: {cfg.base} does not exist")
    tok_dir = _checkpoint_dir(cfg.tokenizer_source) if cfg.tokenizer_source is not None else config_dir
    if not tok_dir.exists():
        raise MergeConfigError(f"tokenizer_source: {tok_dir} does not exist")
    if args.nproc < 1:
        raise MergeConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if not 0 <= args.seed < 2**63:
        raise MergeConfigError(f"--seed must lie in [0, 2**63), got {args.seed}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeConfigError("--device cuda: torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise MergeConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    shard_size = _size(args.shard_size)
    out_dtype_cli = DTYPES[args.dtype] if args.dtype else None

    names = list(reference.keys())
    ref_label = "base_model" if base_ck is not None else merged[0].label
    for ck, label in zip(model_cks, resolver_labels(merged)):
        missing = [n for n in names if n not in ck]
        if missing:
            raise MergeConfigError(f"{label} lacks tensor {missing[0]!r} of {ref_label}"
                                   f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        extra = [n for n in ck.keys() if n not in reference]
        if extra:
            notes.append(f"{label}: {len(extra)} tensors that {ref_label} lacks are ignored (e.g. {extra[0]!r})")
    t_of = _layer_t(names)
    sources = ([base_ck] if base_ck is not None else []) + model_cks
    source_labels = (["base_model"] if base_ck is not None else []) + resolver_labels(merged)
    jobs = []
    vocab_rows = None
    for name in names:
        infos = [ck.info(name) for ck in sources]
        shapes = [i.shape for i in infos]
        rows = None
        if any(s != shapes[0] for s in shapes):
            rows = _embed_rows(name, shapes, source_labels, args.embed_slice)
            vocab_rows = rows if vocab_rows is None else min(vocab_rows, rows)
        shape = shapes[0] if rows is None else (rows,) + tuple(shapes[0][1:])
        in_dtypes = [i.dtype for i in infos]
        floats = [d.is_floating_point for d in in_dtypes]
        if not all(floats):
            if any(floats) or len(set(in_dtypes)) > 1:
                raise MergeConfigError(f"tensor {name!r} has dtypes {[str(d) for d in in_dtypes]} across "
                                       f"{', '.join(source_labels)}: cannot merge integer with float tensors")
            jobs.append(Job(name, shape, in_dtypes[0], False, rows, {}, 0, infos[0].nbytes,
                            tensor_bytes(in_dtypes[0], shape), _numel(shape)))
            continue
        work = [cfg.dtype or d for d in in_dtypes]
        bad = next((label for d, label in zip(work, source_labels) if d not in MERGEABLE), None)
        if bad is not None:
            raise MergeConfigError(f"{bad}: tensor {name!r} is {work[source_labels.index(bad)]}; pykernels merges "
                                   f"float32, bfloat16 and float16 (set dtype: in the config to convert)")
        out_dtype = out_dtype_cli or cfg.out_dtype or cfg.dtype or work[0]
        kw = resolver.kwargs(name, t_of[name])
        jobs.append(Job(name, shape, out_dtype, True, rows, kw, tensor_seed(args.seed, name),
                        sum(i.nbytes for i in infos), tensor_bytes(out_dtype, shape), _numel(shape)))
    if not jobs:
        raise MergeConfigError(f"{ref_label} holds no tensors")
    _check_with_engine(method, jobs)
    plan = Plan(cfg, method, base_ck, model_cks, resolver_labels(merged), reference, jobs, out, shard_size,
                cfg.dtype, args.global_density, notes=notes, vocab_rows=vocab_rows, config_dir=config_dir,
                tokenizer_dir=tok_dir)
    if args.global_density:
        _check_global(plan)
    return plan


def resolver_labels(merged: list[ModelEntry]) -> list[str]:
    return [e.label for e in merged]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(value) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise MergeConfigError(f"--shard-size: {e}") from None


def _checkpoint_dir(path: Path) -> Path:
    return path.parent if path.is_file() else path


def _embed_rows(name: str, shapes: list, labels: list[str], embed_slice: bool) -> int:
    """mergekit's vocabulary truncation (--unsafe-truncate-embeddings): keep the common prefix of rows along the
    vocabulary axis (0) of embedding / output tensors; every other dimension must match."""
    desc = ", ".join(f"{label} {tuple(s)}" for label, s in zip(labels, shapes))
    if not VOCAB_TENSOR.search(name):
        raise MergeConfigError(f"tensor {name!r} has different shapes: {desc}")
    if not embed_slice:
        raise MergeConfigError(f"tensor {name!r} has different shapes: {desc}; pass --embed-slice to keep the "
                               f"first min(vocabulary) rows of every model (mergekit's --unsafe-truncate-embeddings: "
                               f"it assumes the shared token ids mean the same tokens)")
    if any(len(s) != len(shapes[0]) or tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
        raise MergeConfigError(f"tensor {name!r}: --embed-slice truncates the vocabulary axis (0) only, but the "
                               f"other dimensions differ: {desc}")
    return min(s[0] for s in shapes)


def _check_with_engine(method: str, jobs: list[Job]) -> None:
    """Backstop: every distinct argument set goes through merge() on a tiny input, so anything the engine would
    reject is reported now, with the tensor that uses it."""
    from .merging import merge

    seen = set()
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(8)
    tensors = None
    for job in jobs:
        if not job.merge:
            continue
        key = repr(sorted(job.kwargs.items()))
        if key in seen:
            continue
        seen.add(key)
        n = len(job.kwargs.get("weights", [])) or None
        if tensors is None or (n and len(tensors) != n):
            count = n or _count_from(job)
            tensors = [torch.randn(8, generator=g) for _ in range(count)]
        try:
            merge(None if method == "linear" else base, tensors, method, seed=0, backend="reference",
                  **job.kwargs)
        except (ValueError, TypeError) as e:
            raise MergeConfigError(f"merge_method {method} rejects the parameters of tensor {job.name!r}: {e}") \
                from None


def _count_from(job: Job) -> int:
    d = job.kwargs.get("densities")
    return len(d) if isinstance(d, list) else 2


def _check_global(plan: Plan) -> None:
    from .merging import METHODS

    sparsifier = METHODS[plan.method].sparsifier
    if sparsifier not in ("magnitude", "band", "random"):
        raise MergeConfigError(f"--global-density applies to ties, dare_ties, dare_linear, breadcrumbs and "
                               f"breadcrumbs_ties, not to {plan.method}")
    merged = [j for j in plan.jobs if j.merge]
    first = merged[0].kwargs
    for key, word in (("densities", "density"), ("gammas", "gamma")):
        for j in merged:
            if j.kwargs.get(key) != first.get(key):
                raise MergeConfigError(f"--global-density needs one {word} per model for the whole model, but "
                                       f"tensor {j.name!r} gets {j.kwargs.get(key)} and {merged[0].name!r} gets "
                                       f"{first.get(key)} (filters / gradients)")
    plan.global_densities = first["densities"]
    plan.global_gammas = first.get("gammas")
    if sparsifier == "random" and not first.get("rescale"):
        plan.notes.append("--global-density with DARE and rescale off changes nothing (masks are element-wise)")


# --- execution --------------------------------------------------------------------------------------------------

def split_jobs(jobs: list[Job], world: int) -> list[range]:
    """Contiguous runs of jobs of about equal cost (input + output bytes), one per process, in plan order."""
    costs = [j.in_bytes + j.out_bytes for j in jobs]
    total = sum(costs) or 1
    owner, acc = [], 0
    for c in costs:
        owner.append(min(world - 1, int((acc + c / 2) * world / total)))
        acc += c
    return [range(owner.index(r), len(owner) - owner[::-1].index(r)) if r in owner else range(0)
            for r in range(world)]


class _Inputs:
    """Loads a job's inputs (views of the mapped files), narrows and converts them, and releases the pages."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan, self.device = plan, device
        self.bytes_read = 0

    def _prepare(self, ck: Checkpoint, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        view = ck.get(job.name)
        self.bytes_read += ck.info(job.name).nbytes
        t = view if job.rows is None else view.narrow(0, 0, job.rows)
        if job.merge and self.plan.input_dtype is not None and t.dtype != self.plan.input_dtype:
            t = t.to(self.plan.input_dtype)
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=False)
        return view, t

    def load(self, job: Job, models=None):
        """(base or None, [tensors]) and a release() callable; models: indices of the models to load."""
        views, base = [], None
        if self.plan.base is not None:
            v, base = self._prepare(self.plan.base, job)
            views.append((self.plan.base, v))
        tensors = []
        for m in (range(len(self.plan.models)) if models is None else models):
            ck = self.plan.models[m]
            v, t = self._prepare(ck, job)
            views.append((ck, v))
            tensors.append(t)

        def release():
            for ck, v in views:
                ck.release(v, ck.info(job.name).file)
        return base, tensors, release


class GlobalSelection:
    """Model-wide thresholds (magnitude / band) over this process's jobs, all-reduced across processes."""

    def __init__(self, plan: Plan, local: list[Job], inputs: _Inputs, group, progress: bool):
        from .merging import METHODS
        from .model_merging import _global_ranks
        from .selection import StreamingThreshold

        self.local = local
        n = len(plan.models)
        total = sum(j.numel for j in plan.jobs if j.merge)
        k_rule = "floor" if METHODS[plan.method].sparsifier == "band" else "at_least_one"
        gammas = plan.global_gammas or [0.01] * n
        ranks = _global_ranks(plan.method, plan.global_densities, gammas, total, k_rule)
        streams = [StreamingThreshold(0, abs=True, nan="largest") for _ in range(n)]
        for job in _progress(local, progress, "global density: histograms"):
            base, tensors, release = inputs.load(job)
            for m, t in enumerate(tensors):
                d = _task_vector(base, t)
                streams[m].update(d)
                del d
            del tensors
            release()
        if group is not None:
            for s in streams:
                s.all_reduce(group)
        self.thresholds = []
        for m in range(n):
            def d_of(i: int, m=m) -> torch.Tensor:
                base, (t,), release = inputs.load(local[i], [m])
                d = _task_vector(base, t)
                release()
                return d
            self.thresholds.append([streams[m].resolve(d_of, k=k) for k in ranks[m]])

    def for_job(self, i: int, base, tensors) -> torch.Tensor:
        """int64 (N, 2) or (N, 4) engine thresholds of local job i."""
        from . import _backend, _ops

        return engine_thresholds(self.thresholds, i, base, tensors, _ops.primitives(_backend.resolve(None, base.device)))


def _global_l1_scales(plan: Plan, local_range: range, inputs: _Inputs, group, progress: bool) -> torch.Tensor:
    """DARE's l1 rescale over the whole model: per model sum|d| / sum|kept d| over every tensor (per-tensor masks
    seeded by tensor_seed), summed in plan order so every process count gives the same float64 totals."""
    from . import _backend, _ops
    from .reference.merging import SPARSIFIERS

    n = len(plan.models)
    merged = [i for i, j in enumerate(plan.jobs) if j.merge]
    slot = {i: s for s, i in enumerate(merged)}
    table = torch.zeros(len(merged), n, 2, dtype=torch.float64)
    for i in _progress(list(local_range), progress, "global density: l1 norms"):
        job = plan.jobs[i]
        if not job.merge:
            continue
        base, tensors, release = inputs.load(job)
        ops = _ops.primitives(_backend.resolve(None, base.device))
        thresholds = torch.zeros(n, 2, dtype=torch.int64, device=base.device)
        norms = ops.delta_l1_norms(base, tensors, SPARSIFIERS["random"], thresholds, job.kwargs["densities"],
                                   job.seed)
        table[slot[i]] = norms.to(torch.float64).cpu()
        del tensors
        release()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(table, group=group)  # each row is non-zero on one process only: the sum is exact
    totals = torch.zeros(n, 2, dtype=torch.float64)
    for row in table:
        totals += row
    return l1_ratio(totals)


def _changed_fraction(out: torch.Tensor, base: torch.Tensor) -> tuple[float, int]:
    """(fraction, sample size): the share of output elements whose bits differ from the base value cast to the
    output dtype, counted exactly on tensors of up to CHANGED_SAMPLE elements, and beyond on CHANGED_CHUNKS
    evenly spaced contiguous runs of CHANGED_SAMPLE / CHANGED_CHUNKS elements (a full comparison costs as much
    as a third of a TIES merge; contiguous runs keep the sample cache-friendly)."""
    a, b = out.reshape(-1), base.reshape(-1)
    n = a.numel()
    if n > CHANGED_SAMPLE:
        run = CHANGED_SAMPLE // CHANGED_CHUNKS
        starts = [(n - run) * c // (CHANGED_CHUNKS - 1) for c in range(CHANGED_CHUNKS)]
        a = torch.cat([a[s:s + run] for s in starts])
        b = torch.cat([b[s:s + run] for s in starts])
    b = b.to(a.dtype)
    if a.dtype in (torch.bfloat16, torch.float16):
        a, b = a.view(torch.int16), b.view(torch.int16)
    elif a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return int(torch.count_nonzero(a != b)) / max(1, a.numel()), a.numel()


def _kept(plan: Plan, job: Job) -> dict:
    """Per-model keep statistics known without a pass over the data."""
    from .merging import METHODS, _topk_counts
    from .reference.merging import band_counts

    sparsifier = METHODS[plan.method].sparsifier
    kw = job.kwargs
    if sparsifier == "magnitude" and not plan.global_density:
        return {"kept": [k / job.numel for k in _topk_counts(kw["densities"], job.numel, "at_least_one")]}
    if sparsifier == "band" and not plan.global_density:
        targets = _topk_counts(kw["densities"], job.numel, "floor")
        return {"kept": [(lambda ab: (ab[0] - ab[1]) / job.numel)(band_counts(r, g, job.numel, k))
                         for r, g, k in zip(kw["densities"], kw["gammas"], targets)]}
    if sparsifier in ("random", "della"):
        return {"expected_kept": list(kw["densities"])}
    return {}


def _run_hook(count: int) -> None:
    hook = os.environ.get(HOOK_ENV)
    if not hook:
        return
    action, _, rest = hook.partition(":")
    after, _, seconds = rest.partition(":")
    if count != int(after or 1):
        return
    if action == "raise_after":
        raise RuntimeError(f"{HOOK_ENV}: failing on purpose after {count} tensors")
    if action == "sleep_after":
        print(f"{HOOK_ENV}: sleeping after {count} tensors", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 120))


def _tmp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.pykernels-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale(out: Path, log) -> None:
    """Temporary directories of earlier runs on --out whose process is gone (e.g. killed with SIGKILL)."""
    prefix = f".{out.name}.pykernels-tmp-"
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed {p}, left behind by an earlier run that was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_side_files(plan: Plan, tmp: Path) -> list[str]:
    copied = []
    for src_dir, files in ((plan.config_dir, CONFIG_FILES), (plan.tokenizer_dir, TOKENIZER_FILES)):
        for f in files:
            if (src_dir / f).is_file():
                shutil.copyfile(src_dir / f, tmp / f)
                copied.append(f)
    cfg_file = tmp / "config.json"
    if cfg_file.is_file():
        try:
            conf = json.loads(cfg_file.read_text())
        except ValueError:
            return copied
        dtypes = {str(j.out_dtype).replace("torch.", "") for j in plan.jobs if j.merge}
        if len(dtypes) == 1:
            key = "torch_dtype" if "torch_dtype" in conf or "dtype" not in conf else "dtype"
            conf[key] = dtypes.pop()
        if plan.vocab_rows is not None and conf.get("vocab_size") not in (None, plan.vocab_rows):
            conf["vocab_size"] = plan.vocab_rows
        cfg_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return copied


def _return_freed_memory() -> None:
    """glibc keeps freed blocks below its (dynamically raised, up to 32 MiB) mmap threshold in its heaps, so
    a kernel's scratch freed during one tensor would stay resident next to the next output. A fixed threshold
    of 1 MiB gives every large block back to the kernel when it is freed: measured on a 1.1B bf16 merge, peak
    RSS over the idle process drops from ~1.10x to ~1.01x (inputs of the largest tensor + its output), at no
    measurable cost. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover
        pass


def _install_signal_handlers():
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def execute(plan: Plan, args, rank: int = 0, world: int = 1, group=None, log=None) -> dict | None:
    """Merge every job of this process into the temporary directory; rank 0 finishes the checkpoint and returns
    the report. Raises on failure after removing the temporary directory (rank 0)."""
    import torch.distributed as dist

    from .merging import merge

    log = log or (lambda s: None)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    ranges = split_jobs(plan.jobs, world)
    mine = ranges[rank]
    shards = plan.shards
    tmp = None
    writer = None
    try:
        if rank == 0:
            _remove_stale(plan.out, log)
            tmp = Path(os.environ.get(TMP_ENV) or _tmp_name(plan.out))
            plan.out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            writer = ShardedWriter(tmp, shards, create=True)
        if world > 1:
            box = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0, group=group)
            if rank != 0:
                writer = ShardedWriter(Path(box[0]), shards, create=False)
        progress = not args.no_progress and rank == 0
        inputs = _Inputs(plan, device)
        local_jobs = [plan.jobs[i] for i in mine]
        selection = scales = None
        t_sel = time.perf_counter()
        if plan.global_density:
            from .merging import METHODS

            if METHODS[plan.method].sparsifier == "random":
                if any(j.kwargs.get("rescale") for j in plan.jobs if j.merge):
                    scales = _global_l1_scales(plan, mine, inputs, group, progress)
            else:
                local_merged = [j for j in local_jobs if j.merge]
                selection = GlobalSelection(plan, local_merged, inputs, group, progress)
        t_sel = time.perf_counter() - t_sel
        stats = {}
        written = 0
        t_merge = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(local_jobs), desc="merge" if world == 1 else f"merge (rank 0 of {world})",
                       unit="tensor", disable=None, dynamic_ncols=True)
        read_at_start = inputs.bytes_read
        merged_index = 0
        for job in local_jobs:
            t0 = time.perf_counter()
            base, tensors, release = inputs.load(job)
            if not job.merge:
                out = (base if base is not None else tensors[0])
                entry = {"copied": True}
            else:
                prepared = {}
                if selection is not None:
                    prepared["thresholds"] = selection.for_job(merged_index, base, tensors)
                if scales is not None:
                    prepared["scales"] = scales.to(base.device)
                merged_index += 1
                out = merge(base, tensors, plan.method, seed=job.seed, out_dtype=job.out_dtype,
                            _prepared=prepared or None, **job.kwargs)
                entry = {}
                if base is not None:
                    entry["changed"], entry["changed_sample"] = _changed_fraction(out, base)
                entry.update(_kept(plan, job))
            written += writer.write(job.name, out.to("cpu"))
            del out, base, tensors
            release()
            entry["seconds"] = round(time.perf_counter() - t0, 6)
            stats[job.name] = entry
            if bar is not None:
                elapsed = max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{(inputs.bytes_read - read_at_start) / elapsed / 1e9:.2f} GB/s", refresh=False)
                bar.update(1)
            _run_hook(len(stats))
        if bar is not None:
            bar.close()
        t_merge = time.perf_counter() - t_merge
        writer.close()
        local = {"stats": stats, "bytes_read": inputs.bytes_read, "bytes_written": written,
                 "seconds_selection": t_sel, "seconds_merge": t_merge}
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, local, group=group)
        else:
            gathered = [local]
        if rank != 0:
            return None
        writer.write_index()
        copied = _copy_side_files(plan, tmp)
        report = _report(plan, args, gathered, shards, copied, world, time.perf_counter() - t_start)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        _move_into_place(tmp, plan.out)
        tmp = None
        report["seconds"] = time.perf_counter() - t_start
        return report
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"removed the temporary directory {tmp}; {plan.out} was not written")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --overwrite: the old directory goes only once the new one is complete
        old = out.parent / f".{out.name}.pykernels-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _report(plan: Plan, args, gathered: list[dict], shards, copied, world: int, seconds: float) -> dict:
    from . import __version__

    stats = {}
    for part in gathered:
        stats.update(part["stats"])
    bytes_read = sum(p["bytes_read"] for p in gathered)
    bytes_written = sum(p["bytes_written"] for p in gathered)
    params = sum(j.numel for j in plan.jobs)
    tensors = {}
    for j in plan.jobs:
        e = {"shape": list(j.shape), "dtype": str(j.out_dtype).replace("torch.", "")}
        if j.merge:
            e["parameters"] = {k: v for k, v in j.kwargs.items()}
            if any(k in ("densities",) for k in j.kwargs) and plan.method in ("dare_ties", "dare_linear", "della",
                                                                               "della_linear"):
                e["seed"] = j.seed
        e.update(stats.get(j.name, {}))
        tensors[j.name] = e
    return {
        "method": plan.method,
        "config": plan.config.raw,
        "config_file": str(plan.config.source),
        "base_model": str(plan.config.base) if plan.config.base else None,
        "models": plan.model_labels,
        "options": {"device": args.device, "dtype": args.dtype, "global_density": plan.global_density,
                    "global_densities": plan.global_densities, "seed": args.seed, "processes": world,
                    "shard_size": plan.shard_size, "embed_slice": args.embed_slice},
        "notes": plan.notes,
        "definitions": {
            "changed": "fraction of the tensor's elements whose merged value differs (bitwise, in the output dtype) "
                       "from the base model's value; counted on changed_sample elements: all of them up to 2^16, "
                       "beyond that 16 evenly spaced contiguous runs of 4096 elements",
            "kept": "per merged model, the fraction of the task vector's entries its sparsifier keeps: exactly "
                    "k / numel for ties' magnitude top-k (k = max(1, int(density * numel))) and breadcrumbs' band",
            "expected_kept": "per merged model, the keep probability of DARE's / DELLA's random masks (the density)",
            "seconds": "wall time of the tensor: load, merge, write",
        },
        "totals": {"tensors": len(plan.jobs), "parameters": params, "bytes_read": bytes_read,
                   "bytes_written": bytes_written, "seconds": round(seconds, 3),
                   "seconds_selection": round(max(p["seconds_selection"] for p in gathered), 3),
                   "seconds_merge": round(max(p["seconds_merge"] for p in gathered), 3),
                   "shards": len(shards.files), "copied_files": copied},
        "versions": {"pykernels": __version__, "torch": torch.__version__},
        "tensors": tensors,
    }


# --- command line -----------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit-style YAML config (models, base_model, merge_method, parameters, dtype)")
    p.add_argument("--out", required=True, help="output directory (written to a temporary directory beside it and "
                                                "renamed into place at the end)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="output dtype (default: the config's out_dtype, else its "
                                                          "dtype, else the base model's)")
    p.add_argument("--global-density", action="store_true",
                   help="one magnitude threshold per model over all its tensors (ties, breadcrumbs*); whole-model "
                        "l1 rescale for dare_*")
    p.add_argument("--embed-slice", "--unsafe-truncate-embeddings", dest="embed_slice", action="store_true",
                   help="embedding / lm_head tensors of different vocabulary sizes: keep the first min(vocab) rows "
                        "(mergekit's --unsafe-truncate-embeddings)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the merge is done)")
    p.add_argument("--nproc", type=int, default=1, help="split the tensors across N processes on this machine "
                                                        "(torch.distributed, gloo); same output as one process")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE / DELLA masks (per tensor: mixed with its name)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _child_argv(args) -> list[str]:
    argv = [args.config, "--out", args.out, "--device", args.device, "--seed", str(args.seed),
            "--shard-size", str(args.shard_size)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    for flag, on in (("--global-density", args.global_density), ("--embed-slice", args.embed_slice),
                     ("--overwrite", args.overwrite), ("--no-progress", args.no_progress)):
        if on:
            argv.append(flag)
    return argv


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, log) -> int:
    """--nproc N: start N worker processes (rank 0..N-1) with a localhost rendezvous and wait for them; if one
    fails, stop the others and remove the temporary directory."""
    n = args.nproc
    tmp = _tmp_name(Path(args.out).expanduser().absolute())
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(n),
               LOCAL_WORLD_SIZE=str(n), **{CHILD_ENV: "1", TMP_ENV: str(tmp)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    package_root = str(Path(__file__).resolve().parent.parent)  # the workers import this same pykernels
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pykernels", "merge", *_child_argv(args)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(n)]
    stopping = None  # time the workers were asked to stop

    def stop(signum=None, frame=None):
        nonlocal stopping
        stopping = stopping or time.monotonic()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed and stopping is None:
                rc = failed[0].returncode
                stop()
            if stopping is not None and time.monotonic() - stopping > STOP_GRACE:
                for p in procs:  # a worker blocked in a collective with a dead peer
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        rc = rc or next((c for c in codes if c != 0), 0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"removed the temporary directory {tmp}; {args.out} was not written")
    if stopping is not None and rc == 0:
        rc = 143
    return rc


def _describe(plan: Plan, world: int) -> str:
    shards = plan.shards
    merged = [j for j in plan.jobs if j.merge]
    lines = [f"merge_method {plan.method}: {len(plan.models)} model(s) "
             f"{'averaged' if plan.base is None else 'merged into base_model ' + str(plan.config.base)}"]
    for label in plan.model_labels:
        lines.append(f"  {label}")
    if merged:
        lines.append(f"parameters of {merged[0].name}: {merged[0].kwargs}")
        varying = sum(1 for j in merged if j.kwargs != merged[0].kwargs)
        if varying:
            lines.append(f"  ({varying} tensors get other values: filters / gradients)")
    params = sum(j.numel for j in plan.jobs)
    copied = len(plan.jobs) - len(merged)
    lines.append(f"{len(plan.jobs)} tensors ({params / 1e9:.3f}B parameters; {copied} copied unmerged), read "
                 f"{sum(j.in_bytes for j in plan.jobs) / 1e9:.3f} GB, write {shards.total_size / 1e9:.3f} GB in "
                 f"{len(shards.files)} shard(s) to {plan.out}")
    if plan.global_density:
        lines.append(f"global density: one threshold per model over all tensors, densities {plan.global_densities}")
    if world > 1:
        ranges = split_jobs(plan.jobs, world)
        lines.append("processes: " + ", ".join(f"rank {r}: tensors {rg.start}..{rg.stop - 1}" if len(rg) else
                                               f"rank {r}: none" for r, rg in enumerate(ranges)))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def run(args) -> int:
    """Entry point of `pykernels merge` (also each worker of --nproc and of torchrun)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    worker = os.environ.get(CHILD_ENV) == "1"
    rank = int(os.environ.get("RANK", "0")) if env_world > 1 else 0
    world = env_world if env_world > 1 else 1

    def log(msg: str) -> None:
        if rank == 0:
            print(f"pykernels merge: {msg}", file=sys.stderr, flush=True)

    def fail(msg: str, code: int) -> int:
        if rank == 0:
            print(f"pykernels merge: error: {msg}", file=sys.stderr, flush=True)
        return code

    if args.nproc > 1 and env_world > 1 and not worker:
        return fail("--nproc starts its own processes: do not combine it with torchrun", 2)
    try:
        plan = build_plan(args)
    except MergeConfigError as e:
        return fail(str(e), 2)
    if args.dry_run:
        if rank == 0:
            print(_describe(plan, max(world, args.nproc)))
            print("dry run: nothing written")
        return 0
    if args.nproc > 1 and env_world == 1:
        return _launch(args, log)
    previous = _install_signal_handlers()
    _return_freed_memory()
    gc.freeze()  # torch's objects leave the collector's generations: each collection then walks only ours
    group = None
    try:
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world)
            group = dist.group.WORLD
        report = execute(plan, args, rank, world, group, log)
        if rank == 0 and report is not None:
            t = report["totals"]
            secs = max(report["seconds"], 1e-9)
            print(f"pykernels merge: {t['tensors']} tensors ({t['parameters'] / 1e9:.3f}B parameters) in "
                  f"{secs:.2f} s ({t['tensors'] / secs:.1f} tensors/s, {t['bytes_read'] / secs / 1e9:.2f} GB/s read) "
                  f"-> {plan.out} ({t['shards']} shard(s), merge_report.json)", file=sys.stderr, flush=True)
        return 0
    except Interrupted as e:
        log(f"interrupted ({e.args[0] if e.args else 'signal'})")
        return 130 if (e.args and e.args[0] == "SIGINT") else 143
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - report, clean up (done in execute), fail
        log(f"failed: {type(e).__name__}: {e}")
        if os.environ.get("PYKERNELS_MERGE_TRACEBACK"):
            raise
        return 1
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        if group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
