"""Sharded safetensors writing with the layout fixed up front.

`plan_shards` packs tensors (in the given order) into shards of at most `max_bytes` (a tensor larger than that
gets a shard of its own), the way Hugging Face and mergekit shard: one shard is named `model.safetensors`,
several `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`. `ShardedWriter(create=True)`
writes every header and sizes every file; `write(name, tensor)` then puts the tensor's bytes at its offset
with pwrite. The layout depends only on the tensor list and max_bytes, so any number of processes writing
disjoint tensors into the same files produce the same bytes as one process writing them all.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .reader import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME

_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB', '1e9' (decimal K/M/G/T, binary KiB/MiB/GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"shard size must be a number of bytes or a size like 5GB / 500MB / 2GiB, got {value!r}")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {value!r}")
    return size


def tensor_bytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass
class ShardPlan:
    """files[i] holds entries[i]: {name: (dtype, shape, begin, end)} in write order."""

    files: list[str]
    entries: list[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]
    location: dict[str, int] = field(default_factory=dict)  # name -> shard index

    @property
    def total_size(self) -> int:
        return sum(e[3] - e[2] for shard in self.entries for e in shard.values())

    def header(self, i: int) -> bytes:
        """The 8-byte length + JSON header of shard i, padded with spaces to a multiple of 8 bytes."""
        head = {"__metadata__": {"format": "pt"}}
        for name, (dtype, shape, begin, end) in self.entries[i].items():
            head[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def index(self) -> dict:
        return {"metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[i] for name, i in sorted(self.location.items())}}


def plan_shards(tensors, max_bytes: int) -> ShardPlan:
    """tensors: iterable of (name, dtype, shape) in output order."""
    shards: list[dict] = [{}]
    used = 0
    for name, dtype, shape in tensors:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = tensor_bytes(dtype, shape)
        if shards[-1] and used + nbytes > max_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = (dtype, tuple(int(s) for s in shape), used, used + nbytes)
        used += nbytes
    n = len(shards)
    files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    location = {name: i for i, shard in enumerate(shards) for name in shard}
    return ShardPlan(files, shards, location)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class ShardedWriter:
    """Writes the shards of `plan` in `directory`. create=True writes the headers and sizes the files (one
    process does this); create=False opens files that exist already (the other processes)."""

    def __init__(self, directory, plan: ShardPlan, create: bool = True):
        self.directory, self.plan = Path(directory), plan
        self._fds: dict[int, int] = {}
        self._data_start: list[int] = []
        for i, file in enumerate(plan.files):
            header = plan.header(i)
            self._data_start.append(len(header))
            if create:
                path = self.directory / file
                with open(path, "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + sum(e[3] - e[2] for e in plan.entries[i].values()))

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(self.directory / self.plan.files[i], os.O_WRONLY)
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write one tensor (dtype and shape must match the plan); returns the bytes written."""
        i = self.plan.location[name]
        dtype, shape, begin, end = self.plan.entries[i][name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the shard plan expects "
                             f"{dtype} {shape}")
        if end == begin:
            return 0
        t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        _pwrite_all(self._fd(i), t.numpy(), self._data_start[i] + begin)
        return end - begin

    def write_index(self) -> None:
        """model.safetensors.index.json when there are several shards."""
        if len(self.plan.files) > 1:
            (self.directory / INDEX_NAME).write_text(json.dumps(self.plan.index(), indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
