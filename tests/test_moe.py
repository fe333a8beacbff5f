"""MoE routing: every backend against the reference, vLLM-style acceptance checks, losses (DESIGN.md s6)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pykernels import _ops
from pykernels import moe

from conftest import backend_params

BACKENDS = backend_params()
KERNELS = backend_params(include_reference=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(tokens, experts, dtype=torch.float32, seed=0, kind="random"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, experts, generator=g)
    if kind == "ties":
        x = torch.round(x * 2) / 2                  # many exactly equal logits per row
    elif kind == "equal":
        x = torch.zeros(tokens, experts)
    return x.to(dtype)


def route_case(backend, tokens, experts, k, dtype, kind="random", **kw):
    logits = make_logits(tokens, experts, dtype, seed=tokens + experts + k, kind=kind)
    got = moe.topk_route(logits, k, backend=backend, **kw)
    want = moe.topk_route(logits, k, backend="reference", **kw)
    return got, want


def assert_route_equal(got, want):
    assert got[1].dtype == torch.int32 and got[0].dtype == torch.float32
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)


# --- topk_route ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("experts", [1, 3, 8, 60, 64, 128, 256, 384, 1000])
@pytest.mark.parametrize("k", [1, 2, 6, 8])
@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
def test_route_matches_reference(backend, experts, k, tokens):
    if k > experts:
        pytest.skip("k > E")
    for scoring, bias in (("softmax", None), ("sigmoid", torch.linspace(-1, 0.5, experts))):
        got, want = route_case(backend, tokens, experts, k, torch.float32, scoring=scoring, bias=bias)
        assert_route_equal(got, want)


@pytest.mark.parametrize("experts,k", [(1000, 32), (300, 17), (40, 16), (33, 12), (256, 8)])
@pytest.mark.parametrize("kind", ["random", "ties", "equal"])
def test_route_cpp_selection_paths(experts, k, kind):
    # k <= 16 takes the lane-maximum bound unless ties let more than 16 keys through; k > 16 the sorted insertion
    for scoring, bias in (("softmax", None), ("sigmoid", torch.linspace(-0.5, 0.5, experts))):
        got, want = route_case("cpp", 4096 if experts == 256 else 200, experts, k, torch.float32, kind=kind,
                               scoring=scoring, bias=bias)
        assert_route_equal(got, want)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("experts,groups", [(64, 4), (128, 4), (96, 8), (256, 8)])
@pytest.mark.parametrize("kind", ["ties", "equal"])
def test_grouped_route_with_tied_group_scores(backend, experts, groups, kind):
    # a zero bias keeps the sigmoid ties: group scores are sums of two equal keys, and groups tie with each other
    got, want = route_case(backend, 64, experts, 8, torch.float32, kind=kind, scoring="sigmoid",
                           bias=torch.zeros(experts), num_groups=groups, topk_groups=2)
    assert_route_equal(got, want)


@settings(max_examples=80, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 300), k=st.integers(1, 32), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["random", "ties", "equal"]), groups=st.sampled_from([1, 2, 4]),
       scoring=st.sampled_from(["softmax", "sigmoid"]), with_bias=st.booleans())
def test_route_cpp_property(tokens, experts, k, seed, kind, groups, scoring, with_bias):
    experts = max(experts // groups, 1) * groups
    k = min(k, experts)
    logits = make_logits(tokens, experts, seed=seed, kind=kind)
    bias = torch.randn(experts, generator=torch.Generator().manual_seed(seed)) * 0.3 if with_bias else None
    grouping = dict(num_groups=groups, topk_groups=max(1, groups // 2)) if groups > 1 else {}
    if grouping and k > grouping["topk_groups"] * (experts // groups):
        k = grouping["topk_groups"] * (experts // groups)
    kw = dict(scoring=scoring, bias=bias, **grouping)
    assert_route_equal(moe.topk_route(logits, k, backend="cpp", **kw),
                       moe.topk_route(logits, k, backend="reference", **kw))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "equal"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_dtypes_ties_renormalize(backend, dtype, kind, renormalize):
    got, want = route_case(backend, 97, 64, 6, dtype, kind=kind, renormalize=renormalize, scaling=2.5)
    assert_route_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_go_to_the_lower_expert(backend):
    logits = torch.zeros(3, 10)
    logits[0, [2, 5, 7]] = 1.0
    weights, ids = moe.topk_route(logits, 4, backend=backend)
    assert ids[0].tolist() == [2, 5, 7, 0] and ids[1].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_negative_bias_selects_on_biased_returns_unbiased(backend):
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([0.0, -0.2, -5.0, -5.0])
    weights, ids = moe.topk_route(logits, 2, scoring="sigmoid", bias=bias, renormalize=False, backend=backend)
    assert ids.tolist() == [[1, 0]]                # sigmoid(1)-0.2 > sigmoid(0) > sigmoid(2)-5: all keys < 0.8
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[1.0, 0.0]])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_deepseek_v3_grouped_routing(backend, with_bias):
    tokens, experts = 257, 256
    logits = make_logits(tokens, experts, seed=3)
    bias = torch.randn(experts, generator=torch.Generator().manual_seed(4)) * 0.1 if with_bias else None
    weights, ids = moe.topk_route(logits, 8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4,
                                  scaling=2.5, backend=backend)
    # direct check of the rule: every chosen expert lies in one of the 4 best groups
    keys = torch.sigmoid(logits) + (bias if with_bias else 0)
    top = torch.sort(keys.view(tokens, 8, 32), dim=-1, descending=True).values
    group_score = top[..., :2].sum(-1) if with_bias else logits.view(tokens, 8, 32).amax(-1)
    best = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :4]
    assert all(set((ids[t] // 32).tolist()) <= set(best[t].tolist()) for t in range(tokens))
    torch.testing.assert_close(weights.sum(-1), torch.full((tokens,), 2.5))
    want = moe.topk_route(logits, 8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4, scaling=2.5,
                          backend="reference")
    assert_route_equal((weights, ids), want)


def test_route_errors():
    logits = make_logits(4, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = logits.clone()
        x[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            moe.topk_route(x, 2)
    with pytest.raises(ValueError, match="k must be"):
        moe.topk_route(logits, 9)
    with pytest.raises(ValueError, match="divide"):
        moe.topk_route(logits, 2, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="kept groups"):
        moe.topk_route(logits, 5, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="scoring"):
        moe.topk_route(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="bias"):
        moe.topk_route(logits, 2, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="experts must be"):
        moe.topk_route(make_logits(2, 1025), 2)


# --- align_block_size: vLLM's moe_align_block_size contract -------------------------------------------------

def check_align_invariants(ids, num_experts, block_size, sorted_ids, block_expert_ids, total, expert_map=None):
    pairs = ids.numel()
    flat = ids.reshape(-1).long()
    total = int(total[0])
    assert total % block_size == 0 and sorted_ids.numel() % block_size == 0
    assert sorted_ids.numel() >= pairs + num_experts * (block_size - 1)
    local = torch.ones(num_experts, dtype=torch.bool) if expert_map is None else expert_map >= 0
    valid = sorted_ids[sorted_ids < pairs].long()
    assert torch.equal(torch.sort(valid).values, torch.nonzero(local[flat]).flatten())   # every local pair once
    assert (sorted_ids[total:] == pairs).all() and (block_expert_ids[total // block_size:] == -1).all()
    for b in range(total // block_size):
        members = sorted_ids[b * block_size:(b + 1) * block_size].long()
        members = members[members < pairs]
        assert len(members) > 0                                             # no empty block
        experts = flat[members]
        assert (experts == experts[0]).all()
        mapped = int(experts[0]) if expert_map is None else int(expert_map[experts[0]])
        assert int(block_expert_ids[b]) == mapped
        assert torch.equal(members, torch.sort(members).values)              # ascending within the expert


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,k,experts,block_size", [(0, 2, 8, 16), (1, 1, 3, 4), (7, 2, 8, 16),
                                                          (300, 8, 64, 16), (257, 6, 60, 64), (4096, 8, 256, 128),
                                                          (33, 2, 1000, 32)])
def test_align_block_size(backend, tokens, k, experts, block_size):
    g = torch.Generator().manual_seed(tokens + experts)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.int64)
    got = moe.align_block_size(ids, experts, block_size, backend=backend)
    check_align_invariants(ids, experts, block_size, *got)
    want = moe.align_block_size(ids, experts, block_size, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_align_with_expert_map(backend):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(16, (100, 4), generator=g).to(torch.int32)
    expert_map = torch.full((16,), -1, dtype=torch.int32)
    expert_map[4:8] = torch.arange(4, dtype=torch.int32)              # this rank holds experts 4..7
    got = moe.align_block_size(ids, 16, 8, expert_map=expert_map, backend=backend)
    check_align_invariants(ids, 16, 8, *got, expert_map=expert_map)
    want = moe.align_block_size(ids, 16, 8, expert_map=expert_map, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --- permute / unpermute ----------------------------------------------------------------------------------

def dense_moe(x, weights, ids, experts):
    """The "loop over experts" MoE: out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(len(experts)):
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        out[rows] += weights[rows, slots].unsqueeze(1) * experts[e](x[rows].float())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,num_experts", [(0, 2, 4), (1, 1, 1), (61, 2, 8), (200, 6, 60)])
def test_permute_unpermute_equals_dense_moe(backend, dtype, tokens, k, num_experts):
    g = torch.Generator().manual_seed(tokens * k + num_experts)
    x = torch.randn(tokens, 24, generator=g).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, ids = moe.topk_route(logits, k, backend="reference")
    mats = [torch.randn(24, 24, generator=g) / 5 for _ in range(num_experts)]
    p = moe.permute(x, ids, num_experts, backend=backend)
    assert torch.equal(p.expert_offsets.diff(), torch.bincount(ids.flatten().long(), minlength=num_experts))
    assert torch.equal(p.x_sorted, x[p.perm // k])
    y = torch.cat([p.x_sorted[p.expert_offsets[e]:p.expert_offsets[e + 1]].float() @ mats[e]
                   for e in range(num_experts)]).to(dtype)
    out = moe.unpermute(y, p.perm, weights, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    expected = dense_moe(x, weights, ids, [lambda r, m=m: r @ m for m in mats])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected, **tol)
    ref_p = moe.permute(x, ids, num_experts, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(p, ref_p))
    assert torch.equal(out, moe.unpermute(y, p.perm, weights, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_drops_lowest_weight_first(backend):
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    x = torch.arange(8.0).view(4, 2)
    p = moe.permute(x, ids, 3, weights=weights, capacity_factor=0.75, backend=backend)   # cap = ceil(6 / 3 * .75) = 2
    assert p.perm.tolist() == [2, 6, 1, 7, 5]          # expert 0 keeps t=1 (0.9) and t=3 (0.7), expert 1 t=0 and t=3
    assert p.expert_offsets.tolist() == [0, 2, 4, 5]
    assert p.dropped.tolist() == [[True, False], [False, True], [True, False], [False, False]]
    out = moe.unpermute(p.x_sorted, p.perm, weights, backend=backend)
    assert torch.equal(out[0], weights[0, 1] * x[0])


@pytest.mark.parametrize("backend", KERNELS)
def test_capacity_matches_reference(backend):
    g = torch.Generator().manual_seed(9)
    logits = torch.round(torch.randn(500, 16, generator=g) * 4) / 4     # weight ties
    weights, ids = moe.topk_route(logits, 4, backend="reference")
    x = torch.randn(500, 8, generator=g)
    got = moe.permute(x, ids, 16, weights=weights, capacity_factor=1.1, backend=backend)
    want = moe.permute(x, ids, 16, weights=weights, capacity_factor=1.1, backend="reference")
    assert got.dropped.any()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --- losses -------------------------------------------------------------------------------------------------

def test_switch_aux_loss_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    _, ids = moe.topk_route(logits.detach().float(), 2, backend="reference")
    probs = torch.softmax(logits, -1)
    loss = moe.switch_aux_loss(probs, ids, 6)
    counts = torch.bincount(ids.flatten().long(), minlength=6).double()
    torch.testing.assert_close(loss, 6 * (counts / 24 * probs.mean(0)).sum())
    assert torch.autograd.gradcheck(lambda z: moe.switch_aux_loss(torch.softmax(z, -1), ids, 6), (logits,))
    assert torch.autograd.gradcheck(moe.z_loss, (logits,))
    balanced = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    assert math.isclose(moe.switch_aux_loss(balanced, torch.arange(6).view(6, 1), 6).item(), 1.0)


def test_global_batch_aux_loss_accumulates_until_reset():
    g = torch.Generator().manual_seed(1)
    probs = [torch.softmax(torch.randn(10, 4, generator=g), -1) for _ in range(2)]
    ids = [torch.randint(4, (10, 2), generator=g) for _ in range(2)]
    loss = moe.GlobalBatchAuxLoss(4)
    loss(probs[0], ids[0])
    second = loss(probs[1], ids[1])
    counts = torch.bincount(torch.cat(ids).flatten(), minlength=4).float()
    torch.testing.assert_close(second, 4 * (counts / counts.sum() * probs[1].mean(0)).sum())
    loss.reset()
    torch.testing.assert_close(loss(probs[1], ids[1]), moe.switch_aux_loss(probs[1], ids[1], 4))


def test_update_expert_bias():
    bias = torch.zeros(4)
    moe.update_expert_bias(bias, torch.tensor([10, 2, 6, 6]), 0.01)
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


# --- torch.library --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    ops = _ops.primitives(backend)
    logits = make_logits(37, 64)
    torch.library.opcheck(ops.moe_topk_route, (logits, 6, 0, None, True, 0, 0, 1.0))
    torch.library.opcheck(ops.moe_topk_route, (logits, 6, 1, torch.zeros(64), True, 8, 4, 2.0))
    weights, ids = moe.topk_route(logits, 6, backend="reference")
    torch.library.opcheck(ops.moe_align_block_size, (ids, 64, 16, None))
    x = torch.randn(37, 16)
    torch.library.opcheck(ops.moe_permute, (x, ids, weights, 64, 0.0))
    torch.library.opcheck(ops.moe_permute, (x, ids, weights, 64, 1.0))
    xs, perm, _, _ = ops.moe_permute(x, ids, weights, 64, 0.0)
    torch.library.opcheck(ops.moe_unpermute, (xs, perm, weights))


def _micro_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.softmax(torch.randn(16, 6, generator=g), -1), torch.randint(6, (16, 2), generator=g))
            for _ in range(2)]


def _global_loss_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loss = moe.GlobalBatchAuxLoss(6)
    values = [loss(probs, ids) for probs, ids in _micro_batches(rank)]
    torch.save(torch.stack(values), f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_global_batch_aux_loss_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "loss")
    mp.spawn(_global_loss_worker, args=(2, port, path), nprocs=2, join=True)
    per_rank = torch.stack([torch.load(f"{path}.{r}") for r in range(2)])          # (rank, micro-batch)
    batches = [_micro_batches(r) for r in range(2)]
    for step in range(2):
        # single process, the concatenated batch of both ranks, counts accumulated over micro-batches 0..step
        ids_so_far = torch.cat([batches[r][s][1] for r in range(2) for s in range(step + 1)])
        probs = torch.cat([batches[r][step][0] for r in range(2)])
        counts = torch.bincount(ids_so_far.flatten(), minlength=6).float()
        expected = 6 * (counts / counts.sum() * probs.mean(0)).sum()
        torch.testing.assert_close(per_rank[:, step].mean(), expected)
