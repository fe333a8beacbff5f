"""pykernels.integrations.mergekit: the patched mergekit against mergekit's own (unpatched) code.

Deterministic methods must give mergekit's outputs on continuous data (no ties in |delta|). DARE/DELLA draw
their masks from pykernels' counter-based stream: they are compared with mergekit's code running on the same
masks (torch.bernoulli replaced by our stream), and their keep rates are checked otherwise.
"""
from __future__ import annotations

import hashlib
import math
import sys
import types

import pytest
import torch

pytest.importorskip("mergekit")
mk_sparsify = pytest.importorskip("mergekit.sparsify")
mk_methods = pytest.importorskip("mergekit.merge_methods")
mk_gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
mk_sce = pytest.importorskip("mergekit.merge_methods.sce")

from conftest import BernoulliFromOurStream, make_models  # noqa: E402
from pykernels.integrations import mergekit as pm  # noqa: E402
from pykernels.reference.merging import model_seed, philox_uniform, random_keep  # noqa: E402

merge_tensors = mk_methods.merge_tensors
WEIGHTS = [0.5, -0.3, 0.7, 1.2]
DENSITIES = [0.5, 0.4, 0.3, 0.9]
GAMMAS = [0.05, 0.2, 0.01, 0.0]
EPSILONS = [0.1, 0.2, 0.05, 0.08]
FP32 = dict(atol=3e-6, rtol=3e-6)


@pytest.fixture(autouse=True)
def clean_patch_state():
    pm.unpatch()
    pm.reset_stats()
    yield
    pm.unpatch()


def run_both(fn, *, seed=None):
    """(mergekit's own result, the patched result) of fn()."""
    expected = fn()
    with pm.patched(seed):
        got = fn()
    return expected, got


def gta_parameters(method, n, variant):
    params = {"weight": WEIGHTS[:n]}
    if method != "task_arithmetic":
        params["density"] = DENSITIES[:n]
    if method.startswith("breadcrumbs"):
        params["gamma"] = GAMMAS[:n]
    if method.startswith("della"):
        params["epsilon"] = EPSILONS[:n]
    return {**params, **variant}


VARIANTS = {
    "defaults": {},
    "normalize_lambda_int8": {"normalize": True, "lambda": 0.7, "int8_mask": True},
    "rescale_no_normalize": {"rescale": True, "normalize": False},
}
SHAPES = [(64, 37), (1000,), (6, 20, 7)]


# --- deterministic methods: equal outputs ---------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_deterministic_methods_equal_mergekit(method, shape, n, variant):
    base, tensors = make_models(shape, n, torch.float32, seed=len(shape) + n)
    params = gta_parameters(method, n, VARIANTS[variant])
    expected, got = run_both(lambda: merge_tensors([base] + tensors, method, parameters=params, base_index=0))
    torch.testing.assert_close(got, expected, **FP32)
    assert pm.stats()["routed"] == {"merge_group": 1}


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("sparsification", [None, "magnitude", "magnitude_outliers"])
def test_custom_gta_instances_equal_mergekit(consensus, sparsification):
    """Any GeneralizedTaskArithmeticMerge (here count consensus, which no registered method uses) is routed."""
    method = mk_gta.GeneralizedTaskArithmeticMerge(
        consensus_method=mk_gta.ConsensusMethod(consensus),
        sparsification_method=None if sparsification is None else mk_sparsify.SparsificationMethod(sparsification),
        default_normalize=True, default_rescale=False, method_name="custom", method_pretty_name=None,
        method_reference_url=None)
    base, tensors = make_models((40, 30), 4, torch.float32, seed=5)
    params = {"weight": WEIGHTS, "lambda": 1.3}
    if sparsification:
        params["density"] = DENSITIES
    expected, got = run_both(lambda: merge_tensors([base] + tensors, method, parameters=params, base_index=0))
    torch.testing.assert_close(got, expected, **FP32)
    assert pm.stats()["routed"] == {"merge_group": 1}


def tie_free_models(shape, n, seed):
    """Inputs exact in bf16 whose task vectors have distinct magnitudes (k * 2^-10, k = 1..numel), so bf16
    and fp32 select the same elements."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    assert numel <= 192
    base = torch.randint(-64, 65, shape, generator=g) * 2.0**-10
    tensors = []
    for _ in range(n):
        k = (torch.randperm(numel, generator=g) + 1).reshape(shape).float()
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        tensors.append(base + sign * k * 2.0**-10)
    return base, tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(12, 16), (150,), (4, 6, 8)], ids=str)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_low_precision_equals_mergekit(method, shape, dtype):
    """bf16/fp16 inputs: we compute in float32 and round once, so the result is mergekit's float32 merge of
    the same values rounded to the input dtype; mergekit's own bf16/fp16 merge (computed in that dtype) agrees
    within a few roundings (except sce, whose bf16 variances tie: compare it with the float32 merge only)."""
    base, tensors = tie_free_models(shape, 3, seed=len(shape))
    low = [t.to(dtype) for t in [base] + tensors]
    assert all(torch.equal(a.float(), b) for a, b in zip(low, [base] + tensors))
    params = ({"select_topk": 0.4} if method == "sce"
              else gta_parameters(method, 3, {"normalize": True, "lambda": 0.7}))
    exact = merge_tensors([base] + tensors, method, parameters=params, base_index=0)
    expected, got = run_both(lambda: merge_tensors(low, method, parameters=params, base_index=0))
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), exact.to(dtype).float(), atol=eps * 2**-3, rtol=eps)
    if method != "sce":
        # mergekit rounds the weights and the elected sums to the input dtype: where the weighted deltas nearly
        # cancel (e.g. -0.3 rounds to -0.30078 in bf16 and a sum of -1e-4 becomes 0), it can elect the other sign.
        # Such elements are rare; everywhere else the two agree within a few roundings.
        scale = float(exact.abs().max())
        close = (got.float() - expected.float()).abs() <= 4 * eps * scale
        allowed = 0 if method in ("task_arithmetic", "breadcrumbs") else max(1, close.numel() // 50)
        assert int((~close).sum()) <= allowed, int((~close).sum())


@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("shape", [(48, 29), (300,), (5, 7, 9)], ids=str)
def test_sce_equals_mergekit(shape, density):
    base, tensors = make_models(shape, 3, torch.float32, seed=6)
    params = {"select_topk": density, "int8_mask": density == 0.3}
    expected, got = run_both(lambda: merge_tensors([base] + tensors, "sce", parameters=params, base_index=0))
    torch.testing.assert_close(got, expected, **FP32)
    assert pm.stats()["routed"] == {"sce": 1}


@pytest.mark.parametrize("rescale", [None, "l1"])
@pytest.mark.parametrize("shape", [(64, 37), (1000,), (3,), ()], ids=str)
def test_sparsify_functions_equal_mergekit(shape, rescale):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    calls = {}
    for density in [0.0, 0.01, 0.3, 0.5, 0.99, 1.0, 1.5, -0.2]:
        calls[f"magnitude {density}"] = (
            lambda d=density: mk_sparsify.sparsify(delta, d, "magnitude", rescale_norm=rescale))
        for gamma in [0.0, 0.01, 0.3, 2.0]:
            calls[f"outliers {density} {gamma}"] = (
                lambda d=density, g=gamma: mk_sparsify.magnitude_outliers(delta, d, rescale, gamma=g))
    expected = {key: fn() for key, fn in calls.items()}
    with pm.patched():
        got = {key: fn() for key, fn in calls.items()}
    for key in calls:
        torch.testing.assert_close(got[key], expected[key], **FP32, msg=key)
    fallbacks = pm.stats()["fallback"]
    assert fallbacks == {"magnitude_outliers": 4}, fallbacks  # the negative density: mergekit's own code


# --- DARE / DELLA: the same masks give the same outputs -------------------------------------------------

class DellaBernoulli:
    """torch.bernoulli stand-in for mergekit's della_magprune: keep where our uniform < mergekit's probability,
    the uniform of each element taken at its index in pykernels' ranking layout (rows along dim 1)."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, probs, *args, **kwargs):
        layout = probs.movedim(1, -1) if probs.dim() >= 3 else probs
        u = philox_uniform(model_seed(self.seed, self.calls), torch.arange(probs.numel())).reshape(layout.shape)
        if probs.dim() >= 3:
            u = u.movedim(-1, 1)
        self.calls += 1
        return (u < probs.float()).to(probs.dtype)


@pytest.mark.parametrize("variant", list(VARIANTS) + ["no_rescale"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_equal_mergekit_on_our_masks(monkeypatch, method, shape, variant):
    base, tensors = make_models(shape, 3, torch.float32, seed=11)
    params = gta_parameters(method, 3, {"rescale": False} if variant == "no_rescale" else VARIANTS[variant])
    name = f"model.layers.0.{method}.weight"
    seed = 1234
    with pm.patched(seed):
        got = merge_tensors([base] + tensors, method, parameters=params, base_index=0, name=name)
        stream_seed = pm.seed_for(name)
    stand_in = DellaBernoulli if method.startswith("della") else BernoulliFromOurStream
    monkeypatch.setattr(torch, "bernoulli", stand_in(stream_seed))
    expected = merge_tensors([base] + tensors, method, parameters=params, base_index=0, name=name)
    torch.testing.assert_close(got, expected, **FP32)
    assert pm.stats()["routed"] == {"merge_group": 1}


@pytest.mark.parametrize("rescale", [None, "l1"])
@pytest.mark.parametrize("shape", [(64, 37), (500,), (4, 9, 11)], ids=str)
def test_random_sparsifiers_equal_mergekit_on_our_masks(monkeypatch, shape, rescale):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with pm.patched():
        got_dare = mk_sparsify.bernoulli(delta, 0.35, rescale)
        got_della = mk_sparsify.della_magprune(delta, 0.4, 0.15, rescale)
        seed = pm.seed_for(None)
    monkeypatch.setattr(torch, "bernoulli", BernoulliFromOurStream(seed))
    torch.testing.assert_close(got_dare, mk_sparsify.bernoulli(delta, 0.35, rescale), **FP32)
    monkeypatch.setattr(torch, "bernoulli", DellaBernoulli(seed))
    torch.testing.assert_close(got_della, mk_sparsify.della_magprune(delta, 0.4, 0.15, rescale), **FP32)


# --- DARE / DELLA: keep rates and seeds -----------------------------------------------------------------

def _within(rate, p, n, sigmas=5.0):
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dare_keep_rates(dtype):
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(256, 256, generator=g).to(dtype)
    n = delta.numel()
    assert delta.all()
    with pm.patched():
        for p in [0.1, 0.5, 0.9]:
            kept = mk_sparsify.bernoulli(delta, p) != 0
            assert _within(kept.float().mean().item(), p, n), (p, kept.float().mean().item())


def test_dare_models_of_a_group_draw_independent_streams():
    """Model i of the group named `name` keeps where pykernels' stream i of seed_for(name) says so; two models'
    masks overlap like independent draws (p^2)."""
    base, tensors = make_models((256, 128), 2, torch.float32, seed=2)
    n, p = base.numel(), 0.3
    masks = []
    with pm.patched():
        for weights in ([1.0, 0.0], [0.0, 1.0]):  # one model's contribution at a time
            merged = merge_tensors([base] + tensors, "dare_linear", base_index=0, name="w",
                                   parameters={"weight": weights, "density": p, "rescale": False})
            masks.append((merged != base).reshape(-1))
        seed = pm.seed_for("w")
    for i, mask in enumerate(masks):
        assert torch.equal(mask, random_keep(n, p, seed, i))
        assert _within(mask.float().mean().item(), p, n)
    assert _within((masks[0] & masks[1]).float().mean().item(), p * p, n)


def test_della_keep_rates_follow_ranks():
    rows, cols, band = 64, 4096, 400
    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    with pm.patched():
        kept = mk_sparsify.della_magprune(delta, 0.5, 0.3) != 0
    by_rank = kept.gather(1, delta.abs().argsort(dim=1)).float()
    probability = 0.2 + 0.6 * torch.arange(cols, dtype=torch.float64) / (cols - 1)  # rank r -> 0.2 + 0.6 (r-1)/(n-1)
    assert _within(kept.float().mean().item(), 0.5, delta.numel())
    for ranks in (slice(0, band), slice(cols - band, cols)):
        expected = probability[ranks].mean().item()
        assert _within(by_rank[:, ranks].mean().item(), expected, rows * band), (ranks, expected)


def test_masks_are_deterministic_and_seeded(monkeypatch):
    base, tensors = make_models((80, 50), 2, torch.float32, seed=9)
    params = {"weight": [1.0, 0.5], "density": 0.4}

    def run(name="w"):
        return merge_tensors([base] + tensors, "dare_ties", parameters=params, base_index=0, name=name)

    with pm.patched():
        assert pm.base_seed() == 0
        torch.manual_seed(0)
        first = run()
        torch.manual_seed(1)
        assert torch.equal(run(), first), "torch's generator must not matter"
        assert not torch.equal(run("other.weight"), first), "another tensor name draws other masks"
    with pm.patched(seed=7):
        assert pm.base_seed() == 7
        assert not torch.equal(run(), first)
        digest = int.from_bytes(hashlib.blake2b(b"w", digest_size=8).digest(), "little")
        assert pm.seed_for("w") == (7 + digest) % 2**63
        assert pm.seed_for(None) == pm.seed_for("") == (7 + int.from_bytes(
            hashlib.blake2b(b"", digest_size=8).digest(), "little")) % 2**63
        seeded = run()
    monkeypatch.setenv(pm.SEED_ENV, "7")
    with pm.patched():
        assert torch.equal(run(), seeded)


# --- mergekit's errors and fallbacks --------------------------------------------------------------------

def _raises_both(fn):
    """fn raises the same exception type and message patched and unpatched."""
    with pytest.raises(Exception) as unpatched:
        fn()
    with pm.patched(), pytest.raises(type(unpatched.value)) as patched:
        fn()
    assert str(patched.value) == str(unpatched.value)
    return unpatched.value


def test_errors_preserved():
    base, tensors = make_models((8, 6), 2, torch.float32, seed=1)
    delta = tensors[0] - base
    error = _raises_both(lambda: mk_sparsify.della_magprune(delta, 0.9, 0.2))
    assert isinstance(error, ValueError) and "Epsilon" in str(error)
    _raises_both(lambda: merge_tensors([base] + tensors, "della", base_index=0,
                                       parameters={"weight": 1.0, "density": 0.1, "epsilon": 0.1}))
    _raises_both(lambda: mk_sparsify.bernoulli(delta, -0.5))  # torch.bernoulli: p out of range
    _raises_both(lambda: merge_tensors([base] + tensors, "dare_ties", base_index=0,
                                       parameters={"weight": 1.0, "density": -0.5}))
    _raises_both(lambda: mk_sparsify.della_magprune(torch.tensor(2.0), 0.5, 0.1))  # 0-d
    _raises_both(lambda: mk_sparsify.della_magprune(torch.ones(5, 1), 0.5, 0.1))  # one column: NaN probabilities
    _raises_both(lambda: mk_sparsify.magnitude(delta, 0.5, rescale_norm="l3"))
    _raises_both(lambda: mk_sparsify.sparsify(delta, 0.5, "no_such_method"))
    _raises_both(lambda: merge_tensors([base] + tensors, "ties", base_index=0, parameters={"density": 0.5}))
    _raises_both(lambda: merge_tensors([base, tensors[0][:4]], "ties", base_index=0, parameters={"weight": 1.0}))
    _raises_both(lambda: merge_tensors([base] + tensors, "ties", base_index=0,
                                       parameters={"weight": 1.0, "bogus": 1}))


def test_magnitude_density_zero_returns_zeros_like_mergekit():
    """mergekit 0.1.5 returns zeros for magnitude density 0 (it does not raise), and so does the patch."""
    delta = torch.randn(10, 10)
    expected, got = run_both(lambda: mk_sparsify.magnitude(delta, 0.0))
    assert torch.equal(got, expected) and not got.any()
    base, tensors = make_models((10, 10), 2, torch.float32)
    expected, got = run_both(lambda: merge_tensors([base] + tensors, "ties", base_index=0,
                                                   parameters={"weight": 1.0, "density": 0.0}))
    assert torch.equal(got, expected) and torch.equal(got, base)


def test_fallbacks_run_mergekit_code():
    """float64, autograd, l2/linf and empty inputs run mergekit's own implementation, with its results."""
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    params = {"weight": [0.7, 0.4], "density": 0.6, "normalize": True}
    expected, got = run_both(lambda: merge_tensors(inputs, "ties", parameters=params, base_index=0))
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    grads = [t.float().requires_grad_() for t in inputs]
    expected, got = run_both(lambda: merge_tensors(grads, "ties", parameters=params, base_index=0))
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert grads[1].grad is not None
    delta = inputs[1].float() - inputs[0].float()
    for norm in ["l2", "linf"]:
        expected, got = run_both(lambda: mk_sparsify.magnitude(delta, 0.5, norm))
        assert torch.equal(got, expected)
    expected, got = run_both(lambda: mk_sparsify.magnitude(torch.empty(2, 0), 0.5))
    assert got.shape == (2, 0)
    counts = pm.stats()
    assert counts["fallback"]["merge_group"] == 2 and counts["fallback"]["magnitude"] >= 3, counts
    assert "merge_group" not in counts["routed"], counts


def test_no_models_besides_base_returns_base():
    base = torch.randn(4, 4)
    with pm.patched():
        assert torch.equal(merge_tensors([base], "ties", base_index=0, parameters={"weight": 1.0}), base)
        assert torch.equal(merge_tensors([base], "sce", base_index=0), base)


# --- the public entry points all reach the kernels ------------------------------------------------------

def test_state_dicts_and_method_objects_are_routed():
    base, tensors = make_models((16, 12), 2, torch.float32, seed=3)
    states = [{"a.weight": t, "b.weight": t[0] * 2} for t in [base] + tensors]
    params = {"weight": [0.6, 0.4], "density": 0.5}
    expected, got = run_both(lambda: mk_methods.merge_state_dicts(states, "ties", base=0, parameters=params))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **FP32)
    method = mk_methods.get("breadcrumbs_ties")
    group = mk_methods.TensorGroup.from_tensors([base] + tensors, base_index=0, name="x")
    expected, got = run_both(lambda: method((group,), parameters=params)[0])
    torch.testing.assert_close(got, expected, **FP32)
    assert pm.stats()["routed"] == {"merge_group": 3}


# --- patch / unpatch / patched() ------------------------------------------------------------------------

def _snapshot():
    return ({name: getattr(mk_sparsify, name) for name in ("magnitude", "bernoulli", "magnitude_outliers",
                                                           "della_magprune", "sparsify")},
            vars(mk_gta.GeneralizedTaskArithmeticMerge)["merge_group"], mk_sce.sce_merge.implementation)


def test_patch_unpatch_restore_everything():
    before = _snapshot()
    holder = types.ModuleType("_pk_test_holder")  # a module that imported mergekit's functions by name
    holder.magnitude = mk_sparsify.magnitude
    holder.renamed_della = mk_sparsify.della_magprune
    holder.ours = pm.magnitude  # a module that imported ours by name is left alone
    sys.modules[holder.__name__] = holder
    try:
        pm.patch()
        after = _snapshot()
        assert pm.is_patched()
        for name in ("magnitude", "bernoulli", "magnitude_outliers", "della_magprune"):
            assert after[0][name] is not before[0][name]
        assert after[0]["sparsify"] is before[0]["sparsify"]  # it dispatches through the patched globals
        assert after[1] is not before[1] and after[2] is not before[2]
        assert holder.magnitude is after[0]["magnitude"] and holder.renamed_della is after[0]["della_magprune"]
        pm.patch()  # idempotent
        assert _snapshot() == after
        late = types.ModuleType("_pk_test_late")  # imported while patched
        late.bernoulli = mk_sparsify.bernoulli
        sys.modules[late.__name__] = late
        pm.unpatch()
        assert _snapshot() == before and not pm.is_patched()
        assert holder.magnitude is before[0]["magnitude"] and holder.renamed_della is before[0]["della_magprune"]
        assert late.bernoulli is before[0]["bernoulli"]
        assert holder.ours is pm.magnitude
        pm.unpatch()  # a no-op
        assert _snapshot() == before
    finally:
        sys.modules.pop("_pk_test_holder", None)
        sys.modules.pop("_pk_test_late", None)


def test_context_manager_restores_on_error_and_nests():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with pm.patched(seed=3):
            assert pm.is_patched() and pm.base_seed() == 3
            raise RuntimeError("boom")
    assert _snapshot() == before and not pm.is_patched()
    pm.patch()
    with pm.patched(seed=5):
        assert pm.base_seed() == 5
    assert pm.is_patched(), "an outer patch() stays active after an inner patched() block"
    pm.unpatch()
    assert _snapshot() == before


def test_bad_seed_rejected(monkeypatch):
    with pytest.raises(ValueError, match="seed"):
        pm.patch(seed=-1)
    monkeypatch.setenv(pm.SEED_ENV, "not a number")
    with pytest.raises(ValueError):
        pm.patch()
    assert not pm.is_patched()
