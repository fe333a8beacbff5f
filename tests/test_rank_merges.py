"""DELLA and SCE through the public API, and whole-model merges with global density."""
from __future__ import annotations

import pytest
import torch

import pykernels as pk
import pykernels.merging as merging
from conftest import backend_params, make_models
from pykernels.reference.merging import tensor_seed


# --- DELLA ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_3d_ranks_along_dim_1_like_mergekit(backend, method):
    base, tensors = make_models((3, 9, 4), 2, torch.float32, seed=1)
    got = pk.merge(base, tensors, method, densities=0.5, seed=2, backend=backend)
    assert torch.equal(got, pk.merge(base, tensors, method, densities=0.5, seed=2, backend="reference"))
    # The same merge on 2-D rows made of dim 1 (moved last) is the same computation.
    rows = lambda t: t.movedim(1, -1).reshape(-1, 9)  # noqa: E731
    moved = pk.merge(rows(base), [rows(t) for t in tensors], method, densities=0.5, seed=2, backend="reference")
    assert torch.equal(got, moved.reshape(3, 4, 9).movedim(-1, 1))


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id != "triton"])  # 64 row sorts: minutes
def test_sparsify_della_keeps_by_rank_and_rescales_by_p(backend):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 2000, generator=g)
    out = pk.sparsify(d, "della", 0.5, epsilon=0.3, seed=9, backend=backend)
    kept = out != 0
    ranks = pk.rank(d, dim=-1)
    low, high = kept[ranks <= 200].float().mean(), kept[ranks > 1800].float().mean()
    assert 0.2 < low < 0.26 and 0.74 < high < 0.8  # p runs from 0.2 to 0.8 with the rank
    p = 0.2 + (0.6 / 1999) * (ranks[kept] - 1).float()
    torch.testing.assert_close(out[kept], d[kept] / p, rtol=1e-5, atol=0)
    same = pk.sparsify(d, "della", 0.5, epsilon=0.3, seed=9, rescale="none", backend=backend)
    assert torch.equal(same != 0, kept) and torch.equal(same[kept], d[kept])


@pytest.mark.parametrize("call, match", [
    (lambda b, ts: pk.della(b, ts, densities=0.1), r"density \+/- epsilon must lie in \(0, 1\)"),
    (lambda b, ts: pk.della(b, ts, densities=0.5, epsilons=-0.1), r"epsilons\[0\] must be >= 0"),
    (lambda b, ts: pk.ties(b, ts, densities=0.5, epsilons=0.1), "epsilons apply to the DELLA methods only"),
    (lambda b, ts: pk.sparsify(ts[0], "magnitude", 0.5, epsilon=0.1), "epsilon applies to method 'della' only"),
    (lambda b, ts: pk.sce(b, ts, density=0.5, weights=[1, 2]), "computes its own weights"),
    (lambda b, ts: pk.sce(b, ts, density=0.5, lambda_=0.5), "takes only densities"),
    (lambda b, ts: pk.merge(b, ts, "sce", densities=[0.2, 0.3]), "give one density"),
])
def test_argument_errors(call, match):
    base, tensors = make_models((4, 5), 2, torch.float32)
    with pytest.raises(ValueError, match=match):
        call(base, tensors)


def test_della_edge_densities_keep_all_or_nothing():
    base, tensors = make_models((5, 7), 2, torch.float32)
    everything = pk.merge(base, tensors, "della_linear", densities=1.0, rescale="none")
    assert torch.equal(everything, pk.task_arithmetic(base, tensors))
    nothing = pk.merge(base, tensors, "della_linear", densities=0.0)
    assert torch.equal(nothing, base)


# --- SCE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sce_streaming_equals_reference(backend, density, dtype, monkeypatch):
    monkeypatch.setattr(merging, "SCE_CHUNK", 64)  # many chunks: thresholds and ties across chunk borders
    base, tensors = make_models((37, 19), 3, dtype, seed=4)
    tensors[1] = torch.round(tensors[1].float() * 8).div(8).to(dtype)  # tied variances
    want = pk.sce(base, tensors, density=density, backend="reference")
    got = pk.sce(base, tensors, density=density, backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-7, atol=0)  # weights: float64 partial sums


def test_sce_hand_computed():
    base = torch.zeros(4)
    tensors = [torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([1.0, 4.0, -2.0, -1.0])]
    # variance across the two models: [0, 4, 4, 0]; non-zero count 2; density 0.5 keeps k = 1: index 1 (the
    # lower index of the tie). Selected: [0, 0, 0, 0] and [0, 4, 0, 0]; weights (0, 4) / 4 = (0, 1).
    got = pk.sce(base, tensors, density=0.5)
    assert got.tolist() == [0.0, 4.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", backend_params())
def test_sce_nonfinite_task_vectors_raise(backend):
    base, tensors = make_models((6, 6), 2, torch.float32)
    tensors[1][2, 3] = float("nan")  # NaN variance ranks first: always selected, so the weight is NaN
    with pytest.raises(ValueError, match=r"SCE weight of tensors\[1\] is nan"):
        pk.sce(base, tensors, density=0.5, backend=backend)


# --- whole models ---------------------------------------------------------------------------------------------

def _toy_model(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (11, 6), "norm": (6,), "attn": (2, 3, 5), "head": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.round(torch.randn(v.shape, generator=g) * 4) / 16 for k, v in base.items()}
              for _ in range(3)]
    return base, models


def _concat(model):
    return torch.cat([t.reshape(-1) for t in model.values()])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("method, extra", [
    ("ties", {}), ("breadcrumbs", {"gammas": 0.05}), ("breadcrumbs_ties", {"gammas": [0.1, 0.0, 0.02]})])
def test_global_density_equals_merging_the_concatenated_model(backend, method, extra):
    base, models = _toy_model(0)
    densities = [0.3, 0.55, 0.2]
    out = pk.merge_model(base, models, method, densities=densities, global_density=True, backend=backend, **extra)
    want = pk.merge(_concat(base), [_concat(m) for m in models], method, densities=densities, backend="reference",
                    **extra)
    assert list(out) == list(base) and all(out[k].shape == base[k].shape for k in base)
    assert torch.equal(_concat(out), want)
    per_tensor = pk.merge_model(base, models, method, densities=densities, backend=backend, k_rule="floor", **extra)
    assert not torch.equal(_concat(per_tensor), want)  # the global threshold is a different selection


def test_global_dare_rescales_by_whole_model_norms():
    base, models = _toy_model(1)
    out = pk.merge_model(base, models, "dare_linear", densities=0.4, seed=3, global_density=True)
    norms = sum(pk._ops.primitives("reference").delta_l1_norms(
        base[k], [m[k] for m in models], 2, torch.zeros(3, 2, dtype=torch.int64), [0.4] * 3, tensor_seed(3, k))
        for k in base)
    scales = (norms[:, 0] / norms[:, 1]).float()
    for k in base:
        want = pk.merge(base[k], [m[k] for m in models], "dare_linear", densities=0.4, seed=tensor_seed(3, k),
                        rescale="none", weights=scales.tolist())
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)


def test_merge_model_seeds_each_tensor_by_name():
    """Same-shaped tensors get independent DARE masks: tensor `name` is merged with tensor_seed(seed, name)."""
    base, models = _toy_model(1)
    base = {"a": base[next(iter(base))], "b": base[next(iter(base))].clone()}
    models = [{"a": m[next(iter(m))], "b": m[next(iter(m))].clone()} for m in models]
    out = pk.merge_model(base, models, "dare_ties", densities=0.5, seed=11)
    for k in base:
        want = pk.merge(base[k], [m[k] for m in models], "dare_ties", densities=0.5, seed=tensor_seed(11, k))
        assert torch.equal(out[k], want)
    assert not torch.equal(out["a"], out["b"])


def test_merge_model_streams_through_on_tensor_and_checks_names():
    base, models = _toy_model(2)
    seen = []
    out = pk.merge_model(base, models, "ties", densities=0.5, k_rule="floor",
                         on_tensor=lambda name, t: seen.append((name, t.shape)))
    assert out == {} and [n for n, _ in seen] == list(base)
    del models[1]["norm"]
    with pytest.raises(KeyError, match="models\\[1\\] lacks tensor 'norm'"):
        pk.merge_model(base, models, "ties", densities=0.5)
    with pytest.raises(ValueError, match="global_density applies to methods"):
        pk.merge_model(base, [models[0]], "task_arithmetic", global_density=True)
