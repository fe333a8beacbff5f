"""pykernels.integrations.peft against peft's own merge_utils (skipped when peft is not installed).

Deterministic functions: equal to peft's on continuous data without magnitude ties (bfloat16 data is drawn
from distinct bfloat16 magnitudes), bit for bit where the arithmetic is the same and within float32 rounding
where the fused engine sums in its own order. Random ones: keep-rate statistics, the 1/density rescale, and,
with peft's torch.bernoulli replaced by our counter-based masks, the same masks and results.
"""
from __future__ import annotations

import contextlib
import sys
import types
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
mu = pytest.importorskip("peft.utils.merge_utils")

from pykernels.integrations import peft as pk_peft  # noqa: E402
from pykernels.reference.merging import random_keep  # noqa: E402

FP32_CLOSE = dict(atol=2e-6, rtol=2e-6)
WHOLE = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts unpatched, with the deterministic seed 0 and empty stats."""
    pk_peft.unpatch()
    pk_peft.set_seed(0)
    pk_peft.reset_stats()
    yield
    pk_peft.unpatch()
    pk_peft.set_seed(None)


def distinct(shape, dtype, g, n=1):
    """n tensors whose |values| are all distinct in `dtype` (no top-k ties), random signs."""
    numel = torch.Size(shape).numel()
    out = []
    for _ in range(n):
        if dtype == torch.float32:
            out.append(torch.randn(shape, generator=g))
            continue
        lo, hi = (int(torch.tensor(v, dtype=dtype).view(torch.int16)) for v in (2.0 ** -12, 2.0 ** 12))
        mags = (lo + torch.randperm(hi - lo, generator=g)[:numel]).to(torch.int16).view(dtype).float()
        signs = torch.randint(0, 2, (numel,), generator=g) * 2 - 1
        out.append((mags * signs).to(dtype).reshape(shape))
    return out


def assert_fp32_close(got, expected, tasks, weights, msg=None):
    """Equal up to float32 rounding of a weighted sum: |error| <= 4 eps * sum_i |w_i| max|t_i| (+ 2e-6 relative)."""
    scale = sum(abs(float(w)) * float(t.abs().max()) for w, t in zip(weights.reshape(-1).tolist(), tasks))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, expected, atol=max(4 * eps * scale, 1e-7), rtol=2e-6, msg=msg)


def call(module, name, tasks, weights, density, sign_method=None):
    fn = getattr(module, name)
    if name == "task_arithmetic":
        return fn(tasks, weights)
    if sign_method is None:
        return fn(tasks, weights, density)
    return fn(tasks, weights, density, sign_method)


class SeededBernoulli:
    """Stands in for torch.bernoulli in peft's own code: the j-th call of a merge of n task tensors draws model
    m = j % n of random call c = j // n, i.e. the mask pk_peft draws for it after set_seed(seed)."""

    def __init__(self, seed: int, n: int, p: float | None = None):
        self.seed, self.n, self.p, self.calls = seed, n, p, 0

    def __call__(self, probs, *args, **kwargs):
        c, m = divmod(self.calls, self.n)
        self.calls += 1
        p = float(probs.reshape(-1)[0]) if self.p is None else self.p
        keep = random_keep(probs.numel(), p, pk_peft.call_seed(self.seed, c), m)
        return keep.reshape(probs.shape).to(probs.dtype)


@contextlib.contextmanager
def peft_bernoulli(seed: int, n: int, p: float | None = None):
    original = torch.bernoulli
    torch.bernoulli = SeededBernoulli(seed, n, p)
    try:
        yield
    finally:
        torch.bernoulli = original


# --- deterministic functions equal peft's ----------------------------------------------------------------

CASES = [(shape, n) for shape in [(64, 37), (1000,), (3, 4, 5)] for n in (1, 3, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, sign_method", [("task_arithmetic", None), ("magnitude_prune", None),
                                               ("ties", "total"), ("ties", "frequency")])
def test_whole_merges_equal_peft(name, sign_method, dtype):
    g = torch.Generator().manual_seed(1)
    for shape, n in CASES:
        tasks = distinct(shape, dtype, g, n)
        weights = torch.rand(n, generator=g) * 2 - 0.5
        for density in (0.35, 0.0, 0.9):
            expected = call(mu, name, tasks, weights, density, sign_method)
            got = call(pk_peft, name, tasks, weights, density, sign_method)
            assert got.dtype == expected.dtype == torch.float32  # bf16 tasks * fp32 weights: fp32, as in peft
            assert_fp32_close(got, expected, tasks, weights, msg=f"{shape} n={n} density={density}")
    assert pk_peft.stats() == {(name, "fused"): len(CASES) * 3}


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
def test_low_precision_weights(name):
    """bf16 tasks and bf16 weights: peft rounds every product and the sum to bf16, we compute in fp32 and round
    once, so ours is the exact result correctly rounded to bf16 (up to fp32 error) and never further from it."""
    g = torch.Generator().manual_seed(2)
    tasks = distinct((40, 30), torch.bfloat16, g, 3)
    weights = torch.tensor([0.7, -0.3, 1.1], dtype=torch.bfloat16)
    sign = "total" if name == "ties" else None
    expected = call(mu, name, tasks, weights, 0.4, sign)
    got = call(pk_peft, name, tasks, weights, 0.4, sign)
    assert got.dtype == expected.dtype == (torch.float32 if name == "ties" else torch.bfloat16)  # peft's / count
    exact = call(mu, name, [t.double() for t in tasks], weights.double(), 0.4, sign)
    error = (got.double() - exact).abs()
    scale = sum(float(t.abs().max()) for t in tasks)
    assert (error <= exact.abs() * 2.0 ** -8 + 1e-6 * scale).all()  # half a bf16 step (8 significant bits)
    assert error.norm() <= (expected.double() - exact).norm()


def test_density_one_warns_like_peft():
    tasks = distinct((20, 10), torch.float32, torch.Generator().manual_seed(3), 3)
    weights = torch.tensor([1.0, 0.5, -0.2])
    for name in ["magnitude_prune", "ties", "dare_linear", "dare_ties"]:
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = getattr(mu, name)(tasks, weights, 1.0)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = getattr(pk_peft, name)(tasks, weights, 1.0)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] and len(ours) == 3
        torch.testing.assert_close(got, expected, **FP32_CLOSE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_building_blocks_bitwise(dtype):
    g = torch.Generator().manual_seed(4)
    for shape, n in CASES:
        tasks = distinct(shape, dtype, g, n)
        for density in (0.0, 0.3, 0.77, 1.0):
            assert torch.equal(pk_peft.magnitude_based_pruning(tasks[0], density),
                               mu.magnitude_based_pruning(tasks[0], density))
        stacked = torch.stack(tasks)
        for method in ("total", "frequency"):
            mask = pk_peft.calculate_majority_sign_mask(stacked, method)
            assert torch.equal(mask, mu.calculate_majority_sign_mask(stacked, method))
            expected = mu.disjoint_merge(stacked, mask)
            got = pk_peft.disjoint_merge(stacked, mask)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert pk_peft.stats()[("calculate_majority_sign_mask", "fused")] == len(CASES)  # frequency: sign_count


def test_majority_sign_with_zeros_and_nan():
    stacked = torch.tensor([[1.0, 0.0, -2.0, float("nan"), 0.0], [-3.0, 0.0, 1.0, 1.0, -1.0],
                            [1.0, 0.0, 0.5, -1.0, 0.0]])
    for method in ("total", "frequency"):
        assert torch.equal(pk_peft.calculate_majority_sign_mask(stacked, method),
                           mu.calculate_majority_sign_mask(stacked, method))


def test_stacked_tensor_input_and_weight_shapes():
    """peft iterates task_tensors (a stacked tensor works except in task_arithmetic) and broadcasts weights."""
    g = torch.Generator().manual_seed(5)
    stacked = torch.randn(3, 12, 7, generator=g)
    for weights in [torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([0.5, -1.0, 2.0]),
                    torch.tensor([[0.5], [-1.0], [2.0]])]:
        for name in ["magnitude_prune", "ties"]:
            torch.testing.assert_close(getattr(pk_peft, name)(stacked, weights, 0.4),
                                       getattr(mu, name)(stacked, weights, 0.4), **FP32_CLOSE)
    assert set(path for _, path in pk_peft.stats()) == {"fused"}
    per_row = torch.rand(3, 12, 1, generator=g)  # one weight per row: peft broadcasts it; the torch path runs
    torch.testing.assert_close(pk_peft.ties(stacked, per_row, 0.4), mu.ties(stacked, per_row, 0.4), **FP32_CLOSE)
    assert pk_peft.stats()[("ties", "torch")] == 1
    with pytest.raises(TypeError):
        pk_peft.task_arithmetic(stacked, torch.ones(3))
    with pytest.raises(TypeError):
        mu.task_arithmetic(stacked, torch.ones(3))


def test_torch_path_float64_and_many_models():
    g = torch.Generator().manual_seed(6)
    tasks64 = [torch.randn(30, 20, dtype=torch.float64, generator=g) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, -0.4], dtype=torch.float64)
    for name in ["task_arithmetic", "magnitude_prune", "ties"]:
        got, expected = call(pk_peft, name, tasks64, w, 0.3, None), call(mu, name, tasks64, w, 0.3, None)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    many = [torch.randn(50, generator=g) for _ in range(70)]  # more than the engine's 64 models
    w70 = torch.rand(70, generator=g)
    torch.testing.assert_close(pk_peft.ties(many, w70, 0.5), mu.ties(many, w70, 0.5), **FP32_CLOSE)
    assert pk_peft.stats()[("ties", "torch")] >= 1 and ("ties", "fused") not in pk_peft.stats()


def test_nonfinite_inputs_follow_peft():
    g = torch.Generator().manual_seed(7)
    tasks = [torch.randn(10, 8, generator=g) for _ in range(3)]
    tasks[0][2, 3] = float("inf")
    tasks[1][5, 5] = float("nan")
    tasks[2][0, 0] = -float("inf")
    tasks[2][2, 3] = -float("inf")
    w = torch.tensor([0.5, 1.0, 0.25])
    for name in ["task_arithmetic", "magnitude_prune", "ties"]:
        torch.testing.assert_close(call(pk_peft, name, tasks, w, 0.3, None), call(mu, name, tasks, w, 0.3, None),
                                   equal_nan=True, **FP32_CLOSE)
    assert torch.equal(pk_peft.magnitude_based_pruning(tasks[1], 0.2).isnan(),
                       mu.magnitude_based_pruning(tasks[1], 0.2).isnan())
    assert pk_peft.stats()[("ties", "recomputed-nonfinite")] == 1


# --- errors where peft raises ------------------------------------------------------------------------------

ERRORS = [
    ("magnitude_based_pruning", lambda m, t, w: m.magnitude_based_pruning(t[0], 1.5), RuntimeError),
    ("magnitude_based_pruning", lambda m, t, w: m.magnitude_based_pruning(t[0], -0.5), RuntimeError),
    ("random_pruning", lambda m, t, w: m.random_pruning(t[0], 1.5, True), RuntimeError),
    ("prune", lambda m, t, w: m.prune(t[0], -0.1, "magnitude"), ValueError),
    ("prune", lambda m, t, w: m.prune(t[0], 0.5, "sideways"), ValueError),
    ("mask", lambda m, t, w: m.calculate_majority_sign_mask(torch.stack(t), "median"), RuntimeError),
    ("ties", lambda m, t, w: m.ties(t, w, 0.5, "median"), RuntimeError),
    ("ties", lambda m, t, w: m.ties(t, w, -0.5), ValueError),
    ("dare_ties", lambda m, t, w: m.dare_ties(t, w, -0.5), ValueError),
    ("dare_linear", lambda m, t, w: m.dare_linear(t, w, -0.5), ValueError),
    ("magnitude_prune", lambda m, t, w: m.magnitude_prune(t, w, -1.0), ValueError),
    ("shapes", lambda m, t, w: m.ties([t[0], t[1][:5]], w[:2], 0.5), RuntimeError),
    ("shapes", lambda m, t, w: m.task_arithmetic([t[0], t[1][:5]], w[:2]), RuntimeError),
    ("empty", lambda m, t, w: m.task_arithmetic([], w), RuntimeError),
    ("weights", lambda m, t, w: m.task_arithmetic(t, torch.ones(2)), RuntimeError),
]


@pytest.mark.parametrize("case", range(len(ERRORS)), ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_where_peft_raises(case):
    _, fn, error = ERRORS[case]
    tasks = [torch.randn(10, 4), torch.randn(10, 4), torch.randn(10, 4)]
    w = torch.tensor([1.0, 0.5, 0.2])
    with pytest.raises(error):
        fn(mu, tasks, w)
    with pytest.raises(error):
        fn(pk_peft, tasks, w)


def test_prune_like_peft():
    t = torch.randn(50)
    with pytest.warns(UserWarning, match="greater than or equal to 1"):
        assert pk_peft.prune(t, 1.0, "magnitude") is t
    assert torch.equal(pk_peft.prune(t, 0.3, "magnitude"), mu.prune(t, 0.3, "magnitude"))
    assert torch.equal(pk_peft.prune(t, 0.0, "random", rescale=False), torch.zeros(50))


# --- random pruning ----------------------------------------------------------------------------------------

def test_random_keep_rate_and_rescale():
    t = torch.randn(200_000, generator=torch.Generator().manual_seed(8)).abs() + 0.5  # no zeros
    for density in (0.1, 0.5, 0.9):
        out = pk_peft.random_pruning(t, density, rescale=True)
        kept = out != 0
        rate = kept.float().mean().item()
        sigma = (density * (1 - density) / t.numel()) ** 0.5
        assert abs(rate - density) < 5 * sigma
        assert torch.equal(out[kept], t[kept] / density)
    # dare_linear: the kept values rescaled by 1/density; each task tensor has its own, independent mask
    pk_peft.set_seed(4)
    first = pk_peft.dare_linear([t, t], torch.tensor([1.0, 0.0]), 0.3)
    pk_peft.set_seed(4)
    second = pk_peft.dare_linear([t, t], torch.tensor([0.0, 1.0]), 0.3)
    for out in (first, second):
        kept = out != 0
        assert abs(kept.float().mean().item() - 0.3) < 5 * (0.21 / t.numel()) ** 0.5
        torch.testing.assert_close(out[kept], t[kept] / 0.3, atol=0, rtol=2e-7)
    assert abs(((first != 0) & (second != 0)).float().mean().item() - 0.09) < 0.005
    pk_peft.set_seed(3)
    a = pk_peft.random_pruning(t, 0.5, False) != 0
    b = pk_peft.random_pruning(t, 0.5, False) != 0
    assert abs((a & b).float().mean().item() - 0.25) < 0.01  # successive calls draw fresh masks


def test_seeds_are_deterministic():
    t = torch.randn(5000)
    pk_peft.set_seed(42)
    first = [pk_peft.random_pruning(t, 0.5, True), pk_peft.dare_ties([t, -t], torch.ones(2), 0.5)]
    pk_peft.set_seed(42)
    again = [pk_peft.random_pruning(t, 0.5, True), pk_peft.dare_ties([t, -t], torch.ones(2), 0.5)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    pk_peft.set_seed(None)  # torch's generator: torch.manual_seed reproduces the masks
    torch.manual_seed(9)
    x = pk_peft.random_pruning(t, 0.5, False)
    torch.manual_seed(9)
    assert torch.equal(x, pk_peft.random_pruning(t, 0.5, False))
    with pytest.raises(ValueError, match="seed"):
        pk_peft.set_seed(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_random_pruning_equals_peft_with_our_masks(dtype):
    t = distinct((300, 7), dtype, torch.Generator().manual_seed(10))[0]
    for density, rescale in [(0.3, True), (0.3, False), (0.81, True), (0.0, False)]:
        pk_peft.set_seed(11)
        got = pk_peft.random_pruning(t, density, rescale)
        with peft_bernoulli(11, 1):
            expected = mu.random_pruning(t, density, rescale)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("name, sign_method", [("dare_linear", None), ("dare_ties", "total"),
                                               ("dare_ties", "frequency")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dare_equals_peft_with_our_masks(name, sign_method, dtype):
    g = torch.Generator().manual_seed(12)
    for shape, n in CASES:
        tasks = distinct(shape, dtype, g, n)
        weights = torch.rand(n, generator=g) * 2 - 0.5
        for density in (0.3, 0.7):
            pk_peft.set_seed(13)
            got = call(pk_peft, name, tasks, weights, density, sign_method)
            with peft_bernoulli(13, n):
                expected = call(mu, name, tasks, weights, density, sign_method)
            assert got.dtype == expected.dtype
            assert torch.equal(got == 0, expected == 0)  # the same masks (and sign election)
            if dtype == torch.float32:
                assert_fp32_close(got, expected, tasks, weights / density)
            else:
                # peft rounds t / density to bf16 before weighting; we keep it in fp32. Both against fp64
                # arithmetic with the same masks (keep probability: density rounded to bf16):
                with peft_bernoulli(13, n, p=float(torch.tensor(density, dtype=dtype))):
                    exact = call(mu, name, [x.double() for x in tasks], weights.double(), density, sign_method)
                ours, theirs = (got.double() - exact).norm(), (expected.double() - exact).norm()
                assert ours <= theirs + 1e-6
    assert pk_peft.stats()[(name, "fused")] == len(CASES) * 2


def test_dare_density_zero_is_nan_like_peft():
    tasks = [torch.randn(6, 5), torch.randn(6, 5)]
    for name in ("dare_linear", "dare_ties"):
        got = getattr(pk_peft, name)(tasks, torch.tensor([1.0, 0.5]), 0.0)
        assert torch.isnan(got).all() and torch.isnan(getattr(mu, name)(tasks, torch.tensor([1.0, 0.5]), 0.0)).all()


# --- autograd ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WHOLE)
def test_gradients_equal_peft(name):
    g = torch.Generator().manual_seed(14)
    base = [torch.randn(16, 9, generator=g) for _ in range(3)]
    w0 = torch.tensor([0.6, -0.2, 1.3])
    upstream = torch.randn(16, 9, generator=g)
    grads = []
    for module in (pk_peft, mu):
        tasks = [x.clone().requires_grad_() for x in base]
        w = w0.clone().requires_grad_()
        pk_peft.set_seed(15)
        with peft_bernoulli(15, 3) if module is mu else contextlib.nullcontext():
            out = call(module, name, tasks, w, 0.5, "total" if "ties" in name else None)
        assert out.requires_grad
        grads.append(torch.autograd.grad(out, tasks + [w], upstream))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert pk_peft.stats()[(name, "fused")] == 1


# --- patching ----------------------------------------------------------------------------------------------

def holders():
    """Every (module name, attribute) in sys.modules holding one of peft's functions or one we installed."""
    found = {}
    for modname, module in list(sys.modules.items()):
        d = getattr(module, "__dict__", None)
        if not isinstance(d, dict) or modname == pk_peft.__name__:
            continue
        for attr, value in list(d.items()):
            if callable(value) and getattr(value, "__module__", None) in (mu.__name__, pk_peft.__name__) \
                    and getattr(value, "__name__", None) in pk_peft.FUNCTIONS:
                found[(modname, attr)] = value
    return found


def test_patch_and_unpatch_every_reference():
    import peft.tuners.lora.model as lora_model

    originals = {name: getattr(mu, name) for name in pk_peft.FUNCTIONS}
    alias = types.ModuleType("fake_user_module")
    alias.my_ties = mu.ties  # an alias imported before patch()
    sys.modules["fake_user_module"] = alias
    try:
        before = holders()
        assert ("peft.tuners.lora.model", "ties") in before and ("fake_user_module", "my_ties") in before
        pk_peft.patch()
        pk_peft.patch()  # idempotent
        for (modname, attr), value in holders().items():
            assert value.__module__ == pk_peft.__name__, (modname, attr)
            assert value._pykernels_original is originals[value.__name__]
        assert lora_model.ties is mu.ties and alias.my_ties is mu.ties
        # a module imported while patched picks up the patched function; unpatch restores it too
        late = types.ModuleType("fake_late_module")
        late.dare_ties = mu.dare_ties
        sys.modules["fake_late_module"] = late
        pk_peft.unpatch()
        pk_peft.unpatch()  # a no-op
        assert holders() == {**before, ("fake_late_module", "dare_ties"): originals["dare_ties"]}
        assert all(getattr(mu, name) is fn for name, fn in originals.items())
        assert late.dare_ties is originals["dare_ties"] and alias.my_ties is originals["ties"]
        # this module's own functions are untouched
        assert pk_peft.ties.__module__ == pk_peft.__name__ and not hasattr(pk_peft.ties, "_pykernels_original")
    finally:
        sys.modules.pop("fake_user_module", None)
        sys.modules.pop("fake_late_module", None)


def test_patched_context_manager():
    original = mu.ties
    with pk_peft.patched(seed=5):
        assert mu.ties is not original and pk_peft.is_patched() and pk_peft.get_seed() == 5
        with pk_peft.patched(seed=6):  # nested: the outer patch survives the inner exit
            assert pk_peft.get_seed() == 6
        assert mu.ties is not original and pk_peft.get_seed() == 5
    assert mu.ties is original and not pk_peft.is_patched() and pk_peft.get_seed() == 0
    with pytest.raises(KeyError):
        with pk_peft.patched():
            raise KeyError("inside")
    assert mu.ties is original


def test_patched_functions_route_through_pykernels():
    tasks = [torch.randn(20, 10), torch.randn(20, 10)]
    with pk_peft.patched():
        from peft.tuners.lora.model import ties  # what add_weighted_adapter calls
        ties(tasks, torch.tensor([1.0, 0.5]), 0.5)
        mu.prune(tasks[0], 0.5, "magnitude")
    assert pk_peft.stats() == {("ties", "fused"): 1, ("magnitude_based_pruning", "fused"): 1}


# --- add_weighted_adapter on a small LoRA model ----------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.lin0 = torch.nn.Linear(16, 24)
        self.lin1 = torch.nn.Linear(24, 12)


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin0", "lin1"],
                                              init_lora_weights=False), adapter_name="x")
    model.add_adapter("y", LoraConfig(r=4, lora_alpha=16, target_modules=["emb", "lin0", "lin1"],
                                      init_lora_weights=False))
    return model


def merged_deltas(model, combination_type, **kwargs):
    from peft.tuners.lora import LoraLayer

    model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "m", combination_type=combination_type, density=0.5,
                               **kwargs)
    with torch.no_grad():
        return {name: module.get_delta_weight("m") for name, module in model.named_modules()
                if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("combination_type, kwargs", [
    ("ties", {}), ("ties", {"majority_sign_method": "frequency"}), ("magnitude_prune", {}), ("linear", {}),
    ("dare_linear", {}), ("dare_ties", {}), ("ties_svd", {}), ("magnitude_prune_svd", {}), ("dare_ties_svd", {}),
])
def test_add_weighted_adapter_patched_equals_unpatched(combination_type, kwargs):
    model = lora_model()
    pk_peft.set_seed(21)
    with peft_bernoulli(21, 2):
        expected = merged_deltas(model, combination_type, **kwargs)
    model = lora_model()
    with pk_peft.patched(seed=21):
        got = merged_deltas(model, combination_type, **kwargs)
    assert expected.keys() == got.keys() and len(got) == 3
    tol = dict(atol=2e-5, rtol=2e-5) if combination_type.endswith("_svd") else FP32_CLOSE
    for name in got:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)
    calls = 3 if combination_type.endswith("_svd") else 6  # one merge per layer, or one per LoRA A and B
    fn = {"linear": "task_arithmetic"}.get(combination_type, combination_type.removesuffix("_svd"))
    assert pk_peft.stats() == {(fn, "fused"): calls}


def test_patch_errors_and_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        pk_peft.patch(backend="fastest")
    assert not pk_peft.is_patched()
    tasks = [torch.randn(30, 11), torch.randn(30, 11), torch.randn(30, 11)]
    w = torch.tensor([0.3, 0.9, -0.5])
    with pk_peft.patched(backend="reference"):
        reference = mu.ties(tasks, w, 0.4)
    torch.testing.assert_close(reference, pk_peft.ties(tasks, w, 0.4), **FP32_CLOSE)
    monkeypatch.setattr(pk_peft, "PEFT_MODULE", "peft_is_not_installed_here")
    with pytest.raises(ImportError, match="needs peft"):
        pk_peft.patch()
    assert not pk_peft.is_patched()
