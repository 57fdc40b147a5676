"""CLAQ: the 1-D k-means, adaptive precision, outlier reservation, bit budget, LUT export."""

import itertools

import pytest
import torch

from tacq_kernels.reference import dequantize
from tacq_quant.claq import (KMeansColumnQuantizer, allocate_bits, outlier_counts, reserve_ratios,
                             reserved_counts)
from tacq_quant.gptq import HessianAccumulator, gptq_quantize
from tacq_quant.kmeans import assign_nearest, kmeans_1d


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_lloyd(values, centroids, max_iter=1000):
    """Textbook Lloyd, point by point: nearest centroid (ties to the lower index), then means."""
    c = [float(v) for v in centroids]
    xs = [float(v) for v in values]
    for _ in range(max_iter):
        c = sorted(c)
        assign = [min(range(len(c)), key=lambda j: (abs(x - c[j]), j)) for x in xs]
        new = []
        for j in range(len(c)):
            members = [x for x, a in zip(xs, assign) if a == j]
            new.append(sum(members) / len(members) if members else c[j])
        if new == c:
            break
        c = new
    return sorted(c)


def sse(values, centroids):
    c = torch.as_tensor(centroids, dtype=torch.float64)
    v = values.to(torch.float64)
    return float(((v[:, None] - c[None, :]) ** 2).min(dim=1).values.sum())


def optimal_sse(values, k):
    """Global optimum of 1-D k-means by brute force: the best of all splits of the sorted values
    into k contiguous runs (optimal 1-D clusters are contiguous)."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        total = 0.0
        for a, b in zip(bounds, bounds[1:]):
            run = xs[a:b]
            m = sum(run) / len(run)
            total += sum((x - m) ** 2 for x in run)
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 4, 8])
def test_kmeans_equals_textbook_lloyd_from_the_same_start(seed, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, generator=g) * torch.rand(60, generator=g)  # heavy-ish tails
    init = x[torch.randperm(60, generator=g)[:k]]
    ours, iters = kmeans_1d(x, k, init_centroids=init)
    ref = naive_lloyd(x.double(), init.double())
    torch.testing.assert_close(ours.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-6)
    assert iters < 300


def test_kmeans_result_is_a_fixed_point_and_assignment_is_nearest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1536, generator=g) * 0.03
    for init in ("kmeans++", "quantile"):
        c, _ = kmeans_1d(x, 16, init=init, generator=torch.Generator().manual_seed(0))
        code = assign_nearest(x, c)
        brute = (x[:, None] - c[None, :]).abs().argmin(dim=1)
        assert torch.equal(code, brute)
        for j in range(16):
            members = x[code == j]
            if members.numel():
                assert float(members.double().mean()) == pytest.approx(float(c[j]), abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_kmeans_reaches_the_global_optimum_on_tiny_data(seed):
    g = torch.Generator().manual_seed(seed)
    # four well separated groups of 3 values: the optimum is unique and Lloyd from k-means++ finds it
    centers = torch.tensor([-3.0, -1.0, 1.5, 4.0])
    x = (centers[:, None] + 0.1 * torch.randn(4, 3, generator=g)).flatten()
    best_of = min(sse(x, kmeans_1d(x, 4, init=i, generator=torch.Generator().manual_seed(s))[0])
                  for i in ("kmeans++", "quantile") for s in range(3))
    assert best_of == pytest.approx(optimal_sse(x, 4), rel=1e-9, abs=1e-12)
    # on arbitrary data Lloyd is a local method: never better than the optimum
    y = torch.randn(10, generator=g)
    c, _ = kmeans_1d(y, 3, init="quantile")
    assert sse(y, c) >= optimal_sse(y, 3) - 1e-9


def test_kmeans_handles_fewer_distinct_values_than_clusters():
    x = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0])
    for init in ("kmeans++", "quantile"):
        c, _ = kmeans_1d(x, 4, init=init, generator=torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(c).all())
        assert float(((x - c[assign_nearest(x, c)]) ** 2).sum()) == 0.0


def test_adaptive_precision_rules():
    counts = torch.tensor([5, 0, 9, 1, 9, 3, 0, 2, 7, 4] * 10)  # 100 columns
    b21 = allocate_bits(counts, 2.1)  # (2.1 - 2)/2 = 5 % of columns get 4 bits
    assert int((b21 == 4).sum()) == 5 and int((b21 == 2).sum()) == 95
    assert bool((counts[b21 == 4].min() >= counts[b21 == 2].max()))  # the columns with most outliers
    b22 = allocate_bits(counts, 2.2)
    assert int((b22 == 4).sum()) == 10
    b31 = allocate_bits(counts, 3.1)  # (3.1 - 3) = 10 % of columns get 4 bits, the rest 3
    assert int((b31 == 4).sum()) == 10 and int((b31 == 3).sum()) == 90
    assert bool((allocate_bits(counts, 3) == 3).all())


def test_outlier_counts_and_reservation_counts():
    w = torch.zeros(10, 4)
    w[:, :] = 0.01
    w[0, 1] = 10.0  # mean |W| ~ 0.26: |10| >= 13 * mean
    w[3, 1] = -10.0
    w[5, 2] = 10.0
    assert outlier_counts(w).tolist() == [0, 2, 1, 0]
    # the authors' counts for n = 4096: 58 + 57 at r = 1.4 %, 17 + 16 at r = 0.4 %
    assert reserved_counts(4096, 0.014) == (58, 57)
    assert reserved_counts(4096, 0.004) == (17, 16)
    ratios = reserve_ratios(torch.arange(20))  # top 10 % = 2 columns (the highest counts)
    assert ratios.tolist()[-2:] == [0.014, 0.014] and set(ratios.tolist()[:-2]) == {0.004}


def claq_problem(n=96, k=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) + 0.2 * torch.randn(1024, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.004] = 0.5  # outliers (|w| >= 13 mean|W|) in some columns
    acc = HessianAccumulator(k)
    acc.add(x)
    return x, w, acc.hessian()


@pytest.mark.parametrize("target", [2, 2.1, 2.2, 3, 3.1])
def test_claq_meets_its_bit_budget_and_exports_lut_segments(target):
    x, w, h = claq_problem()
    quant = KMeansColumnQuantizer(target)
    res = gptq_quantize(w, h, quant, act_order=True)
    packed = res.weight.pack()
    spec = packed.spec
    k = w.shape[1]
    bits = spec.bits_per_weight()
    # mean code bits equal the target up to the rounding of one column
    assert abs(bits["weights"] - target) <= 2 / k + 1e-9
    # all-inclusive: codes (each segment padded to a multiple of 32 columns) + one fp16 codebook
    # per column + the int32 permutation + the (empty) CSR row pointers
    pad = lambda c: -(-c // 32) * 32  # noqa: E731
    expect_total = (sum(s.bits * pad(s.k) * w.shape[0] + 16 * 2**s.bits * s.k for s in spec.segments)
                    + 32 * k + 32 * (w.shape[0] + 1)) / w.numel()
    assert bits["total"] == pytest.approx(expect_total, rel=1e-9)
    # the permutation puts the 4-bit columns in one contiguous run first, the rest after them
    seg_bits = [s.bits for s in spec.segments]
    assert seg_bits == sorted(seg_bits, reverse=True) and len(set(seg_bits)) == len(seg_bits)
    assert all(s.decoder == "lut" for s in spec.segments)
    if not float(target).is_integer():
        n4 = round(((target - 2) / 2 if target < 3 else target - 3) * k)
        assert spec.segments[0].bits == 4 and spec.segments[0].k == n4
        # the 4-bit columns are the ones with the most outliers, and their codebooks moved with them
        counts = outlier_counts(w)
        four = packed.tensors["perm"][: n4].long()
        rest = packed.tensors["perm"][n4:].long()
        assert int(counts[four].min()) >= int(counts[rest].max())
    # the checkpoint decodes to exactly what the loop propagated its errors from
    assert torch.equal(dequantize(packed), res.dequantized)


def test_claq_beats_rtn_like_uniform_grid_at_equal_bits():
    """Non-uniform per-column codebooks fit better than a per-row uniform grid at 2 bits."""
    from tacq_quant.gptq import AffineColumnQuantizer

    x, w, h = claq_problem(seed=3)
    claq = dequantize(gptq_quantize(w, h, KMeansColumnQuantizer(2), act_order=True).weight.pack())
    gptq = dequantize(gptq_quantize(w, h, AffineColumnQuantizer(2), act_order=True).weight.pack())
    err = lambda wh: float(torch.linalg.norm(x @ (w - wh).t()))  # noqa: E731
    assert err(claq) < err(gptq)


def test_claq_outlier_reservation():
    x, w, h = claq_problem(seed=1)
    n, k = w.shape
    quant = KMeansColumnQuantizer(2.2, reserve_outliers=True)
    res = gptq_quantize(w, h, quant, act_order=True)
    keep = res.weight.keep_mask
    # per column: fixed two-sided counts, 1.4 % for the top 10 % of columns by outlier count, 0.4 % else
    counts = outlier_counts(w)
    n_top, n_rest = sum(reserved_counts(n, 0.014)), sum(reserved_counts(n, 0.004))
    per_col = keep.sum(0)
    is_top = per_col == n_top
    assert bool((is_top | (per_col == n_rest)).all())
    assert int(is_top.sum()) == round(0.1 * k)
    assert int(counts[is_top].min()) >= int(counts[~is_top].max())
    for j in range(k):
        # the kept values are the column's largest and smallest (GPTQ-updated) values
        col = res.weight.kept_values[:, j]
        kept_vals, other = col[keep[:, j]], col[~keep[:, j]]
        assert bool(((kept_vals >= other.max()) | (kept_vals <= other.min())).all())
    packed = res.weight.pack()
    assert packed.spec.nnz == int(keep.sum())
    eff = dequantize(packed)
    kept = res.weight.kept_values[keep]
    # LUT: kept weight = c + fp16(w - c): error at most half an fp16 ulp of |w - c|
    from tacq_kernels.reference import dequantize_dense

    c = dequantize_dense(packed)[keep]
    bound = (kept - c).abs() * 2.0**-11 + 2.0**-25
    assert bool(((eff[keep] - kept).abs() <= bound).all())


def _columns(g, n):
    """Test columns of n values: normal, heavy-tailed, with many duplicates, with few distinct values."""
    yield torch.randn(n, generator=g)
    yield torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3 / torch.rand(n, generator=g)
    yield torch.round(torch.randn(n, generator=g) * 4) / 4 + 0.0  # + 0.0: no -0.0 (torch path)
    yield torch.randint(0, 3, (n,), generator=g).float() * 0.01 - 0.005


@pytest.mark.parametrize("n", [1, 3, 576, 1536])
def test_kmeans_fast_path_is_bit_identical_to_the_torch_reference(n, monkeypatch):
    """The numpy path of kmeans_1d (CPU) gives exactly what _kmeans_1d_torch (the original torch
    implementation, still used on other devices) gives: centroids bit for bit, iterations, the
    k-means++ draws and the generator state after the call; assign_nearest likewise."""
    import tacq_quant.kmeans as km

    _kmeans_1d_torch = km._kmeans_1d_torch

    def no_fallback(*args, **kwargs):
        raise AssertionError("these columns must take the numpy path")

    monkeypatch.setattr(km, "_kmeans_1d_torch", no_fallback)
    g = torch.Generator().manual_seed(1000 + n)
    for ci, x in enumerate(_columns(g, n)):
        for k in (4, 8, 16):
            for init, tol in (("kmeans++", 0.0), ("kmeans++", 1e-4), ("quantile", 0.0), ("quantile", 1e-3)):
                seed = 97 * n + 13 * ci + k
                g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
                c1, it1 = kmeans_1d(x, k, init=init, tol=tol, generator=g1)
                c2, it2 = _kmeans_1d_torch(x, k, init=init, tol=tol, generator=g2)
                assert c1.dtype == torch.float32 and c1.shape == (k,)
                assert torch.equal(c1.view(torch.int32), c2.view(torch.int32)), (n, ci, k, init)
                assert it1 == it2
                assert torch.equal(g1.get_state(), g2.get_state())
                assert torch.equal(torch.randint(2**62, (4,), generator=g1), torch.randint(2**62, (4,), generator=g2))
                for cb in (c1, c1.to(torch.float16).to(torch.float32)):  # CLAQ assigns to the fp16 codebook
                    code = assign_nearest(x, cb)
                    mid = (cb[:-1].double() + cb[1:].double()) * 0.5
                    ref = torch.searchsorted(mid, x.double(), right=False)
                    assert code.dtype == ref.dtype and torch.equal(code, ref)
            init_c = x[torch.randint(n, (k,), generator=g)] + 0.01 * torch.randn(k, generator=g)
            c1, it1 = kmeans_1d(x, k, init_centroids=init_c)
            c2, it2 = _kmeans_1d_torch(x, k, init_centroids=init_c)
            assert torch.equal(c1.view(torch.int32), c2.view(torch.int32)) and it1 == it2


def test_kmeans_tolerance_stops_early_near_the_fixed_point():
    """tol > 0 (scikit-learn's rule, CLAQ's default 1e-4) runs fewer Lloyd iterations from the
    same start and ends within a hair of the fixed point's squared error."""
    g = torch.Generator().manual_seed(11)
    fewer = 0
    for _ in range(20):
        x = torch.randn(1536, generator=g) * torch.rand(1536, generator=g) ** 2
        c0, it0 = kmeans_1d(x, 8, generator=torch.Generator().manual_seed(0))
        c1, it1 = kmeans_1d(x, 8, tol=1e-4, generator=torch.Generator().manual_seed(0))
        assert 1 <= it1 <= it0
        fewer += it1 < it0
        sse0, sse1 = (float(((x - c[assign_nearest(x, c)]) ** 2).sum()) for c in (c0, c1))
        assert sse1 <= sse0 * 1.01
    assert fewer >= 10  # the fixed point usually takes a long tail of tiny moves


def test_kmeans_inputs_routed_to_the_torch_path_still_match():
    """-0.0, non-finite values and float64 input take the torch implementation: same results."""
    from tacq_quant.kmeans import _kmeans_1d_torch

    g = torch.Generator().manual_seed(5)
    x = torch.round(torch.randn(200, generator=g) * 2) / 2
    x[::7] = -0.0
    with_inf = torch.cat([x, torch.tensor([float("inf")])])
    for col in (x, x.double(), x.half(), x.bfloat16(), with_inf):
        for init in ("kmeans++", "quantile"):
            if col is with_inf and init == "kmeans++":  # infinite D^2 weights: both raise
                for f in (kmeans_1d, _kmeans_1d_torch):
                    with pytest.raises(ValueError, match="non-finite"):
                        f(col, 8, init=init, generator=torch.Generator().manual_seed(3))
                continue
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            c1, it1 = kmeans_1d(col, 8, init=init, generator=g1)
            c2, it2 = _kmeans_1d_torch(col, 8, init=init, generator=g2)
            assert torch.equal(c1.view(torch.int32), c2.view(torch.int32)) and it1 == it2
            assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_on_cuda_uses_the_torch_path():
    x = torch.randn(1536, device="cuda")
    c, iters = kmeans_1d(x, 8, generator=torch.Generator(device="cuda").manual_seed(0))
    assert c.device.type == "cuda" and c.shape == (8,) and bool((c[1:] >= c[:-1]).all()) and iters > 0
    code = assign_nearest(x, c)
    assert code.device.type == "cuda" and torch.equal(code, (x[:, None] - c[None, :]).abs().argmin(dim=1))


@pytest.mark.parametrize("n", [5, 576, 1536])
def test_weighted_kmeans_paths_agree_and_weights_mean_repetition(n):
    """sample_weight: the numpy path equals the torch reference bit for bit (centroids, iterations,
    generator state); weights of 1 give the unweighted result; integer weights from a given start
    give what repeating each point that many times gives; weight 0 removes a point."""
    from tacq_quant.kmeans import _kmeans_1d_torch

    g = torch.Generator().manual_seed(77 + n)
    for x in _columns(g, n):
        w = torch.rand(n, generator=g) ** 2
        w[torch.rand(n, generator=g) < 0.1] = 0.0
        for k, tol in ((4, 0.0), (8, 1e-4), (16, 0.0)):
            g1, g2 = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
            c1, it1 = kmeans_1d(x, k, tol=tol, generator=g1, sample_weight=w)
            c2, it2 = _kmeans_1d_torch(x, k, tol=tol, generator=g2, sample_weight=w)
            assert torch.equal(c1.view(torch.int32), c2.view(torch.int32)) and it1 == it2
            assert torch.equal(g1.get_state(), g2.get_state())
            ones, plain = (kmeans_1d(x, k, tol=tol, generator=torch.Generator().manual_seed(k), sample_weight=sw)
                           for sw in (torch.ones(n), None))
            assert torch.equal(ones[0], plain[0]) and ones[1] == plain[1]
        reps = torch.randint(0, 4, (n,), generator=g)
        if int((reps > 0).sum()) < 4:
            continue
        start = torch.quantile(x[reps > 0], torch.tensor([0.1, 0.4, 0.6, 0.9]))
        cw, _ = kmeans_1d(x, 4, init_centroids=start, sample_weight=reps.float())
        cr, _ = kmeans_1d(torch.repeat_interleave(x, reps), 4, init_centroids=start)
        torch.testing.assert_close(cw, cr, rtol=1e-6, atol=1e-7)
