"""Sharded safetensors writing with the layout fixed up front.

`plan_shards` packs tensors (in the given order) into shards of at most `max_bytes` (a tensor larger than that
gets a shard of its own), the way Hugging Face and mergekit shard: one shard is named `model.safetensors`,
several `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`. `ShardedWriter(create=True)`
writes every header and sizes every file; `write(name, tensor)` then puts the tensor's bytes at its offset
(O_DIRECT from staging buffers where the file system allows it, else pwrite). The layout depends only on the
tensor list and max_bytes, so any number of processes writing disjoint tensors into the same files produce the
same bytes as one process writing them all.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import re
import threading
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


NO_DIRECT_ENV = "PYKERNELS_NO_DIRECT_IO"
# Direct blocks are whole pages, so no page-cache page ever holds both direct and buffered bytes.
_ALIGN = max(4096, mmap.PAGESIZE)
_STAGE_BYTES = 4 << 20  # 16 MiB in all: within the 10% memory headroom of the merge command
_STAGES = 4


class ShardedWriter:
    """Writes the shards of `plan` in `directory`. create=True writes the headers and sizes the files (one
    process does this); create=False opens files that exist already (the other processes).

    Tensor bytes go to disk with O_DIRECT where the file system allows it: buffered writes into new page-cache
    pages cost about 2 s of kernel CPU per GB on our VMs, direct writes almost none. write() copies the bytes
    into one of a few reused, page-aligned staging buffers (16 MiB in all) and returns; a background thread
    writes them. Only whole 4096-byte blocks inside the bytes this writer writes contiguously (its "run":
    consecutive writes that follow each other in one file) go direct; the partial blocks at a run's edges may
    share a block with the header, the end of the file or another process's tensors, so they go through the page
    cache with pwrite. A file O_DIRECT cannot be opened on (tmpfs: EINVAL) is written buffered; a direct write
    that fails is redone buffered, and the file stays buffered from then on. direct=False, or
    PYKERNELS_NO_DIRECT_IO=1 in the environment (with direct=None), writes everything buffered, synchronously.
    An error in the background thread is raised by the next write() or by close()."""

    def __init__(self, directory, plan: ShardPlan, create: bool = True, direct: bool | None = None):
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
        if direct is None:
            direct = os.environ.get(NO_DIRECT_ENV, "") in ("", "0")
        self._direct = bool(direct) and hasattr(os, "O_DIRECT")
        self._dfds: dict[int, int | None] = {}  # None: O_DIRECT could not be opened
        self._broken: set[int] = set()  # files where a direct write failed
        self._thread = None
        self._run = None  # (file, first offset) of the pending run
        self._pos = 0  # file offset of the run's next byte
        self._buf, self._base = None, 0  # staging buffer being filled; the file offset of its first byte
        self._error, self._reported, self._closed = None, False, False

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(self.directory / self.plan.files[i], os.O_WRONLY)
        return fd

    def _dfd(self, i: int) -> int | None:
        if i not in self._dfds:
            try:
                self._dfds[i] = os.open(self.directory / self.plan.files[i], os.O_WRONLY | os.O_DIRECT)
            except OSError:  # EINVAL on file systems without O_DIRECT; any real problem shows in the buffered open
                self._dfds[i] = None
            if self._dfds[i] is not None and self._thread is None:
                self._views = [memoryview(mmap.mmap(-1, _STAGE_BYTES)) for _ in range(_STAGES)]
                self._free, self._todo = queue.SimpleQueue(), queue.SimpleQueue()
                for b in range(_STAGES):
                    self._free.put(b)
                self._thread = threading.Thread(target=self._drain, name="ShardedWriter", daemon=True)
                self._thread.start()
        return self._dfds[i]

    def _check(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write one tensor (dtype and shape must match the plan); returns the bytes written. With direct I/O the
        bytes are on their way to disk, not necessarily written, when this returns: close() waits for them."""
        if self._closed:
            raise ValueError("write() on a closed ShardedWriter")
        self._check()
        i = self.plan.location[name]
        dtype, shape, begin, end = self.plan.entries[i][name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the shard plan expects "
                             f"{dtype} {shape}")
        if end == begin:
            return 0
        t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        offset = self._data_start[i] + begin
        if not self._direct or self._dfd(i) is None:
            _pwrite_all(self._fd(i), t.numpy(), offset)
            return end - begin
        if self._run is not None and (self._run[0] != i or self._pos != offset):
            self._end_run()
        if self._run is None:
            self._fd(i)  # opened here, not in the thread
            self._run, self._pos = (i, offset), offset
        data = memoryview(t.numpy()).cast("B")
        while data:
            if self._buf is None:
                self._buf = self._free.get()
                self._check()
                self._base = self._pos // _ALIGN * _ALIGN
            at = self._pos - self._base
            n = min(_STAGE_BYTES - at, len(data))
            self._views[self._buf][at:at + n] = data[:n]
            data, self._pos = data[n:], self._pos + n
            if at + n == _STAGE_BYTES:
                self._submit()
        return end - begin

    def _submit(self) -> None:
        """Hand the staging buffer to the thread. A full buffer ends on a block boundary inside the run, so
        only its first bytes (the run's start) can be a partial block; the last buffer of a run can end in one."""
        i, start = self._run
        lo, hi = max(start, self._base), self._pos
        d0, d1 = -(-lo // _ALIGN) * _ALIGN, hi // _ALIGN * _ALIGN
        pieces = [(lo, d0, False), (d0, d1, True), (d1, hi, False)] if d0 < d1 else [(lo, hi, False)]
        self._todo.put((self._buf, self._base, i, [p for p in pieces if p[0] < p[1]]))
        self._buf = None

    def _end_run(self) -> None:
        if self._buf is not None:
            self._submit()
        self._run = None

    def _drain(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, base, i, pieces = item
            try:
                if self._error is None:  # after an error, only hand the buffers back so write() cannot hang
                    for lo, hi, direct in pieces:
                        self._put(i, self._views[buf][lo - base:hi - base], lo, direct)
            except BaseException as e:  # noqa: BLE001 - raised again by write() / close()
                self._error = e
            finally:
                self._free.put(buf)

    def _put(self, i: int, view, offset: int, direct: bool) -> None:
        while direct and view and i not in self._broken:
            try:
                done = os.pwrite(self._dfds[i], view, offset)
            except OSError:  # EINVAL (alignment), or anything else: the page cache path still gets the bytes out
                done = 0
            if done <= 0:
                self._broken.add(i)
            else:
                view, offset = view[done:], offset + done
        _pwrite_all(self._fds[i], view, offset)

    def write_index(self) -> None:
        """model.safetensors.index.json when there are several shards."""
        if len(self.plan.files) > 1:
            (self.directory / INDEX_NAME).write_text(json.dumps(self.plan.index(), indent=2) + "\n")

    def close(self) -> None:
        """Wait for every byte, close the files, and raise a background error write() has not raised yet. Safe to
        call again, and from a `finally` after an exception."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                if self._error is None:
                    self._end_run()
                self._todo.put(None)
                self._thread.join()
                self._views = None
        finally:
            for fd in [*self._fds.values(), *self._dfds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._dfds.clear()
        if not self._reported:
            self._check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
