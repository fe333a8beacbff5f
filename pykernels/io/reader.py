"""Lazy reading of local safetensors checkpoints (single file or sharded with an index json)."""
from __future__ import annotations

import ctypes
import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

# safetensors dtype names -> torch dtypes (those torch has)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, not safetensors, inconsistent index, truncated file."""


class TensorInfo(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int  # byte offsets in the file's data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path, label: str = "") -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset of its data section (checked against the
    file size, so a truncated file is reported here and not halfway through a merge)."""
    where = f"{label}: " if label else ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{where}{path} is not a safetensors file (only {size} bytes)")
            n = struct.unpack("<Q", raw)[0]
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{where}{path} is not a safetensors file (header length {n} does not fit "
                                      f"in {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{where}cannot read {path}: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}{path} is not a safetensors file (bad header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}{path} is not a safetensors file (header is not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{where}{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                  f"but the file has {size} bytes")
    return header, data_start


class Checkpoint:
    """The tensors of a local safetensors checkpoint, loaded one at a time.

    `path`: a directory with model.safetensors.index.json (+ shards) or model.safetensors (or a single
    other *.safetensors file / index json when it is the only one), or a path to a .safetensors file.
    `infos` lists every tensor (name -> TensorInfo) in storage order (shards in index order, then offset).
    `get(name)` returns a zero-copy view of the memory-mapped file (do not write to it); `release(t)` drops the
    resident pages that lie wholly inside `t` (the file stays mapped; a later read faults them in again).
    """

    def __init__(self, path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, list[tuple[int, int]]] = {}
        files = self._files()
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict] = {}
        for file, wanted in files:
            header, _ = read_header(file, self.label)
            self.metadata[file] = header.get("__metadata__") or {}
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0])
            names = set()
            for name, entry in entries:
                if wanted is not None and name not in wanted:
                    continue  # a tensor the index does not list belongs to no model tensor
                if name in self.infos:
                    raise CheckpointError(f"{self.label}: tensor {name!r} is stored twice "
                                          f"({self.infos[name].file.name} and {file.name})")
                dtype = DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{self.label}: tensor {name!r} in {file} has dtype {entry['dtype']}, "
                                          f"which torch {torch.__version__} cannot hold")
                self.infos[name] = TensorInfo(name, dtype, tuple(int(s) for s in entry["shape"]), file,
                                              *entry["data_offsets"])
                names.add(name)
            if wanted is not None:
                absent = [n for n in wanted if n not in names]
                if absent:
                    raise CheckpointError(f"{self.label}: the index maps tensor {absent[0]!r} (and {len(absent) - 1} "
                                          f"more) to {file.name}, which does not hold it")

    def _files(self) -> list[tuple[Path, set | None]]:
        """(file, names the index assigns to it or None) in index order."""
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{self.label}: {p} does not exist (pykernels merge reads local directories only)")
        if p.is_file():
            if p.name.endswith(".index.json"):
                return self._from_index(p)
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{self.label}: {p} is not a .safetensors file")
            return [(p, None)]
        if (p / INDEX_NAME).is_file():
            return self._from_index(p / INDEX_NAME)
        if (p / SINGLE_NAME).is_file():
            return [(p / SINGLE_NAME, None)]
        indexes = sorted(p.glob("*.safetensors.index.json"))
        singles = sorted(p.glob("*.safetensors"))
        if len(indexes) == 1:
            return self._from_index(indexes[0])
        if not indexes and len(singles) == 1:
            return [(singles[0], None)]
        other = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(other[:3])}: only safetensors checkpoints are supported)" if other else ""
        raise CheckpointError(f"{self.label}: {p} holds no {SINGLE_NAME} or {INDEX_NAME}{hint}")

    def _from_index(self, index: Path) -> list[tuple[Path, set]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.label}: cannot read the weight_map of {index}: {e}") from e
        files: dict[str, set] = {}
        for name, file in weight_map.items():
            files.setdefault(file, set()).add(name)
        out = []
        for file, names in files.items():
            path = index.parent / file
            if not path.is_file():
                raise CheckpointError(f"{self.label}: shard {path} listed in {index.name} is missing")
            out.append((path, names))
        return out

    # --- mapping-like access ---------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def keys(self):
        return self.infos.keys()

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            h = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return h

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`: a view of the mapped file (read-only by contract)."""
        info = self.infos[name]
        t = self._handle(info.file).get_tensor(name)
        if t.dtype != info.dtype or tuple(t.shape) != info.shape:  # pragma: no cover - a safetensors bug
            raise CheckpointError(f"{self.label}: {name!r} read as {t.dtype} {tuple(t.shape)}, header says "
                                  f"{info.dtype} {info.shape}")
        return t

    def release(self, t: torch.Tensor, file: Path | None = None) -> None:
        """Drop the resident pages wholly inside tensor t, if t lies in one of this checkpoint's mappings."""
        if t.device.type != "cpu" or t.numel() == 0 or _LIBC is None:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo = -(-start // _PAGE) * _PAGE
        hi = end // _PAGE * _PAGE
        if hi <= lo:
            return
        files = [file] if file is not None else list(self._handles)
        for f in files:
            if any(a <= lo and hi <= b for a, b in self._mappings(f)):
                _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
                return

    def _mappings(self, file: Path) -> list[tuple[int, int]]:
        """Address ranges where `file` is mapped in this process (from /proc/self/maps), looked up once."""
        if file not in self._maps:
            ranges = []
            target = str(file.resolve())
            try:
                with open("/proc/self/maps") as f:
                    for line in f:
                        parts = line.split(maxsplit=5)
                        if len(parts) == 6 and parts[5].strip() == target:
                            a, b = parts[0].split("-")
                            ranges.append((int(a, 16), int(b, 16)))
            except OSError:
                pass
            if file in self._handles:  # cache only once the file is mapped
                self._maps[file] = ranges
            return ranges
        return self._maps[file]

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()


def _libc():
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # pragma: no cover
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
