"""ShardedWriter: O_DIRECT through staging buffers writes the same bytes as buffered pwrite, for odd sizes and
offsets, several shards, several writers sharing files; fallbacks and background errors."""
from __future__ import annotations

import errno
import fcntl
import os
import threading

import pytest
import torch

from pykernels.io import ShardedWriter, plan_shards
from pykernels.io import writer as writer_mod

safetensors_torch = pytest.importorskip("safetensors.torch")


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spec = [(0, torch.bfloat16), (1, torch.bfloat16), (3, torch.float16), (1, torch.float32),
            (1_500_001, torch.bfloat16), (2047, torch.float16), (5, torch.bfloat16), (0, torch.float32),
            (700_003, torch.float32), (4097, torch.bfloat16), (1_000_000, torch.bfloat16), (3, torch.float32),
            (2, torch.bfloat16)]
    spec += [(int(n), torch.bfloat16) for n in torch.randint(1, 200_000, (6,), generator=g)]
    out = {}
    for k, (n, dtype) in enumerate(spec):
        t = torch.randn(n, generator=g).to(dtype)
        out[f"t{k:02d}"] = t.reshape(1, n) if k % 4 == 1 else t
    out["t01"] = torch.randn(3, 5, generator=g).t()  # non-contiguous (fp32, 15 elements)
    return out


def make_plan(tensors, shards: int):
    """shards=1: one file; otherwise several (3 MB shards: the big tensors get their own, the small ones share)."""
    plan = plan_shards([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 10**9 if shards == 1 else 3 * 10**6)
    assert (len(plan.files) == 1) == (shards == 1)
    return plan


def expected_bytes(plan, tensors) -> list[bytes]:
    return [plan.header(i) + b"".join(tensors[n].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                      for n in plan.entries[i]) for i in range(len(plan.files))]


def read_files(directory, plan) -> list[bytes]:
    return [(directory / f).read_bytes() for f in plan.files]


def direct_supported(directory) -> bool:
    path = directory / ".probe"
    path.write_bytes(b"")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        path.unlink()


@pytest.fixture
def direct_log(monkeypatch):
    """Records (offset, length) of every pwrite made through an O_DIRECT fd."""
    log, real = [], os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            log.append((offset, len(memoryview(data))))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return log


@pytest.fixture
def small_stages(monkeypatch):
    monkeypatch.setattr(writer_mod, "_STAGE_BYTES", 64 << 10)
    monkeypatch.setattr(writer_mod, "_STAGES", 2)


def write_all(directory, plan, tensors, direct, create=True, names=None):
    with ShardedWriter(directory, plan, create=create, direct=direct) as w:
        for n in names if names is not None else tensors:
            assert w.write(n, tensors[n]) == tensors[n].numel() * tensors[n].element_size()
        w.write_index()


@pytest.mark.parametrize("stages", ["default", "small"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("direct", [True, False])
def test_bytes_match(tmp_path, direct, shards, stages, direct_log, request):
    if stages == "small":
        request.getfixturevalue("small_stages")
    tensors = make_tensors()
    plan = make_plan(tensors, shards)
    (tmp_path / "a").mkdir()
    write_all(tmp_path / "a", plan, tensors, direct)
    got = read_files(tmp_path / "a", plan)
    assert got == expected_bytes(plan, tensors)
    if direct and direct_supported(tmp_path):
        assert direct_log and all(o % 4096 == 0 and n % 4096 == 0 for o, n in direct_log)
        assert sum(n for _, n in direct_log) > 0.9 * sum(len(b) for b in got)
    if not direct:
        assert not direct_log
    loaded = {}
    for f in plan.files:
        loaded.update(safetensors_torch.load_file(tmp_path / "a" / f))
    assert loaded.keys() == tensors.keys()
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t)
    # the buffered mode writes the same files
    (tmp_path / "b").mkdir()
    write_all(tmp_path / "b", plan, tensors, direct=False)
    assert read_files(tmp_path / "b", plan) == got


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("split", ["alternate", "ranges"])
@pytest.mark.parametrize("shards", [1, 3])
def test_two_writers_share_files(tmp_path, small_stages, shards, split, threads):
    tensors = make_tensors(1)
    plan = make_plan(tensors, shards)
    names = list(tensors)
    if split == "alternate":
        parts = [[n] for n in names]
    else:
        cuts = [0, 3, 7, 8, 12, 15, len(names)]
        parts = [names[a:b] for a, b in zip(cuts, cuts[1:])]
    first = ShardedWriter(tmp_path, plan, create=True)
    second = ShardedWriter(tmp_path, plan, create=False)
    jobs = {first: [n for k, p in enumerate(parts) if k % 2 == 0 for n in p],
            second: [n for k, p in enumerate(parts) if k % 2 == 1 for n in p]}
    if threads:
        def run(w):
            for n in jobs[w]:
                w.write(n, tensors[n])
            w.close()

        ts = [threading.Thread(target=run, args=(w,)) for w in jobs]
        [t.start() for t in ts]
        [t.join() for t in ts]
    else:
        for k, p in enumerate(parts):  # interleaved: each writer's runs stay pending while the other writes
            w = first if k % 2 == 0 else second
            for n in p:
                w.write(n, tensors[n])
        second.close()
        first.close()
    assert read_files(tmp_path, plan) == expected_bytes(plan, tensors)


def test_direct_open_einval_falls_back(tmp_path, monkeypatch, direct_log):
    real = os.open

    def fake_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    tensors = make_tensors()
    plan = make_plan(tensors, 3)
    with ShardedWriter(tmp_path, plan, direct=True) as w:
        for n, t in tensors.items():
            w.write(n, t)
        assert w._thread is None
    assert not direct_log
    assert read_files(tmp_path, plan) == expected_bytes(plan, tensors)


@pytest.mark.parametrize("failure", ["error", "short"])
def test_direct_write_failure_redone_buffered(tmp_path, monkeypatch, small_stages, failure):
    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on the temporary directory")
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(offset)
            if failure == "error" and len(calls) == 3:
                raise OSError(errno.EIO, "injected")
            if failure == "short" and len(memoryview(data)) > 4096:
                return real(fd, memoryview(data)[:4096], offset)  # short but aligned: the rest goes on direct
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    tensors = make_tensors()
    plan = make_plan(tensors, 1)
    write_all(tmp_path, plan, tensors, direct=True)
    assert len(calls) >= 3
    assert read_files(tmp_path, plan) == expected_bytes(plan, tensors)


def test_env_forces_buffered(tmp_path, monkeypatch, direct_log):
    monkeypatch.setenv("PYKERNELS_NO_DIRECT_IO", "1")
    tensors = make_tensors()
    plan = make_plan(tensors, 1)
    write_all(tmp_path, plan, tensors, direct=None)
    assert not direct_log
    assert read_files(tmp_path, plan) == expected_bytes(plan, tensors)


def failing_writer(tmp_path, monkeypatch):
    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on the temporary directory")

    def boom(self, *a):
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(ShardedWriter, "_put", boom)
    tensors = make_tensors()
    return tensors, ShardedWriter(tmp_path, make_plan(tensors, 1), direct=True)


def test_thread_error_surfaces_in_write(tmp_path, monkeypatch, small_stages):
    tensors, w = failing_writer(tmp_path, monkeypatch)
    try:
        with pytest.raises(OSError, match="injected"):
            for n, t in tensors.items():  # more than two 64 KiB stages: write() waits for the thread
                w.write(n, t)
        with pytest.raises(OSError, match="injected"):
            w.write("t00", tensors["t00"])
    finally:
        w.close()  # already reported: no second raise
    w.close()


def test_thread_error_surfaces_in_close(tmp_path, monkeypatch):
    tensors, w = failing_writer(tmp_path, monkeypatch)
    w.write("t02", tensors["t02"])  # stays in staging until close
    with pytest.raises(OSError, match="injected"):
        w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("t02", tensors["t02"])


def test_shape_check(tmp_path):
    tensors = make_tensors()
    with ShardedWriter(tmp_path, make_plan(tensors, 1)) as w:
        with pytest.raises(ValueError, match="shard plan expects"):
            w.write("t04", tensors["t04"].float())
