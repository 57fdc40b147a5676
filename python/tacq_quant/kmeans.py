"""Exact 1-D k-means (Lloyd's algorithm) for CLAQ's per-column codebooks.

In one dimension Lloyd's algorithm needs no distance matrix. With the values sorted once:

* the assignment step is a search: the points nearest to centroid j (centroids sorted) are the
  ones between the midpoints ``(c_{j-1} + c_j)/2`` and ``(c_j + c_{j+1})/2``, so ``searchsorted``
  of the k-1 midpoints in the sorted values gives every cluster as a contiguous run;
* the update step is a difference of prefix sums: the mean of run ``[a, b)`` is
  ``(S[b] - S[a]) / (b - a)`` with ``S`` the cumulative sum of the sorted values.

Each iteration is O(k log n) after an O(n log n) sort, and the result is exactly what textbook
Lloyd iterations give from the same initial centroids (``tests/test_quant_claq.py`` checks this
against a point-by-point loop). A point exactly on a midpoint goes to the lower centroid (the
nearest-centroid rule with ties to the lower index), in both the iterations and
:func:`assign_nearest`. The iterations stop when no point changes cluster (a fixed point), after
``max_iter``, or, with ``tol > 0``, as scikit-learn's ``KMeans`` (which CLAQ's authors call, with
its default ``tol=1e-4``) stops: when the squared centroid shift of an iteration is at most ``tol``
times the variance of the values. Empty clusters keep their previous centroid.

Initialisation: ``"kmeans++"`` (D^2 sampling from a seeded generator: the first centre uniform,
each later one drawn with probability proportional to its squared distance to the nearest centre
so far, by inverse CDF: one uniform per centre) or ``"quantile"`` (centroid j starts at the
``(j + 1/2)/k`` quantile: deterministic, no random numbers).

Two implementations compute the same thing. CLAQ calls these functions once per weight column
on columns of a few hundred to a few thousand values, where torch's per-operation overhead on
tiny tensors dominates. So for CPU tensors the values are sorted in numpy and the Lloyd loop runs
on Python floats (IEEE doubles: the same float64 operations in the same order, ``bisect`` for
the search, a sequential prefix sum like torch's CPU ``cumsum``). The k-means++ draws come from
the same generator through the same torch calls (``torch.randint``, then one float64
``torch.rand`` per centre) and are looked up in the same sequential prefix sums, so the centres
and the generator's state afterwards are those of the torch path. (An earlier version drew
through ``torch.multinomial``, whose exponential draw per point and centre cost CLAQ more time
than the rest of k-means++; the distribution of the centres is the same.) Other devices, and
the rare inputs where the two could differ at all (non-finite values; ``-0.0``, whose order among
equal zeros no sort guarantees; float64 input), use the torch implementation
``_kmeans_1d_torch``. ``tests/test_quant_claq.py`` checks that both give the same
centroids bit for bit, the same iteration counts and the same generator state.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import torch

# float32 or narrower: the values are multiples of 2^-149, so no float64 mean of them underflows
# to -0.0 (the proof that the numpy path never meets a signed-zero tie it could order differently)
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kmeanspp_init(xs: torch.Tensor, k: int, generator: torch.Generator | None,
                   ws: torch.Tensor | None = None) -> torch.Tensor:
    n = xs.numel()
    first = torch.randint(n, (1,), generator=generator, device=xs.device)
    centers = [xs[first]]
    d2 = (xs - centers[0]) ** 2
    for _ in range(1, k):
        cum = torch.cumsum(d2 if ws is None else d2 * ws, 0)
        total = cum[-1]
        if not bool(torch.isfinite(total)):
            raise ValueError("k-means++ of a column with non-finite values (infinite D^2 weights)")
        if not bool(total > 0):  # fewer distinct values than clusters: repeat a centre
            centers.append(centers[-1])
            continue
        # D^2 sampling by inverse CDF: the first point whose cumulative weight exceeds u * total
        # (a point of weight 0 never does before the point ahead of it)
        u = torch.rand(1, dtype=torch.float64, generator=generator, device=xs.device)
        idx = torch.searchsorted(cum, u * total, right=True).clamp_max(n - 1)
        c = xs[idx]
        centers.append(c)
        d2 = torch.minimum(d2, (xs - c) ** 2)
    return torch.cat(centers)


def _quantile_init(xs: torch.Tensor, k: int) -> torch.Tensor:
    n = xs.numel()
    pos = ((torch.arange(k, device=xs.device, dtype=torch.float64) + 0.5) * n / k).long().clamp_max(n - 1)
    return xs[pos]


def _kmeans_1d_torch(
    x: torch.Tensor,
    k: int,
    *,
    init: str = "kmeans++",
    max_iter: int = 300,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
    init_centroids: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """:func:`kmeans_1d` in torch operations on ``x``'s device: the reference implementation."""
    ws = None
    if sample_weight is None:
        xs = torch.sort(x.reshape(-1).to(torch.float64)).values
    else:  # a stable sort: equal values keep their weights in the same order as the numpy path
        xs, order = torch.sort(x.reshape(-1).to(torch.float64), stable=True)
        ws = sample_weight.reshape(-1).to(device=xs.device, dtype=torch.float64)[order]
    n = xs.numel()
    if n == 0:
        raise ValueError("k-means of an empty column")
    if init_centroids is not None:
        c = init_centroids.to(device=xs.device, dtype=torch.float64).reshape(-1)
    elif init == "quantile":
        c = _quantile_init(xs, k)
    elif init == "kmeans++":
        c = _kmeanspp_init(xs, k, generator, ws)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    c = torch.sort(c).values
    prefix = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
    prefix[1:] = torch.cumsum(xs, 0)
    if ws is not None:  # the update step's weighted sums: sum w x and sum w over each run
        wx_prefix = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
        wx_prefix[1:] = torch.cumsum(ws * xs, 0)
        w_prefix = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
        w_prefix[1:] = torch.cumsum(ws, 0)
    zero = torch.zeros(1, dtype=torch.long, device=xs.device)
    last = torch.full((1,), n, dtype=torch.long, device=xs.device)
    tol_scaled = tol * float(torch.cumsum((xs - prefix[n] / n) ** 2, 0)[-1]) / n if tol > 0 else 0.0
    bounds = None
    iters = 0
    for iters in range(1, max_iter + 1):
        mid = (c[:-1] + c[1:]) * 0.5
        new_bounds = torch.searchsorted(xs, mid, right=True)  # points <= mid_j belong to clusters <= j
        if bounds is not None and torch.equal(new_bounds, bounds):
            iters -= 1  # this pass changed nothing: the previous one reached the fixed point
            break
        bounds = new_bounds
        starts = torch.cat([zero, bounds])
        ends = torch.cat([bounds, last])
        if ws is None:
            count = (ends - starts).to(torch.float64)
            sums = prefix[ends] - prefix[starts]
        else:  # a run of weight 0 counts as empty
            count = w_prefix[ends] - w_prefix[starts]
            sums = wx_prefix[ends] - wx_prefix[starts]
        new_c = torch.where(count > 0, sums / torch.where(count > 0, count, 1.0), c)
        shift = float(torch.cumsum((new_c - c) ** 2, 0)[-1])
        c = torch.sort(new_c).values  # only empty clusters can break the order
        if tol > 0 and shift <= tol_scaled:
            break
    return c.to(torch.float32), iters


def _has_negative_zero(a: np.ndarray) -> bool:
    return bool(np.any((a == 0) & np.signbit(a)))


def _kmeanspp_init_np(xs: np.ndarray, k: int, generator: torch.Generator | None,
                      ws: np.ndarray | None = None) -> np.ndarray:
    """:func:`_kmeanspp_init` on numpy values: the same draws from ``generator`` (``torch.randint``
    for the first centre, one ``torch.rand`` float64 per later one), the same sequential prefix
    sums, so the same centres. The tests compare the centres and the generator state."""
    n = xs.size
    first = torch.randint(n, (1,), generator=generator)
    centers = [xs[int(first)]]
    d2 = (xs - centers[0]) ** 2
    cum = np.empty_like(xs)
    tmp = np.empty_like(xs)
    for i in range(1, k):
        if ws is None:
            np.cumsum(d2, out=cum)  # sequential, like torch's CPU cumsum: the same totals
        else:
            np.multiply(d2, ws, out=cum)
            np.cumsum(cum, out=cum)
        total = float(cum[-1])
        if not total > 0:  # fewer distinct values than clusters: repeat a centre
            centers.append(centers[-1])
            continue
        u = float(torch.rand(1, dtype=torch.float64, generator=generator))
        c = xs[min(int(np.searchsorted(cum, u * total, side="right")), n - 1)]
        centers.append(c)
        if i == k - 1:
            break  # the distances to the last centre are never used
        np.subtract(xs, c, out=tmp)
        np.square(tmp, out=tmp)
        np.minimum(d2, tmp, out=d2)
    return np.array(centers, dtype=np.float64)


def _prefix(v: np.ndarray) -> np.ndarray:
    out = np.empty(v.size + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(v, out=out[1:])  # sequential, like torch's CPU cumsum
    return out


def _lloyd_sorted(xs: np.ndarray, c: np.ndarray, max_iter: int, tol: float = 0.0,
                  ws: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The Lloyd loop of :func:`_kmeans_1d_torch` on the sorted values ``xs`` (with their weights
    ``ws``), in Python floats (IEEE doubles: the same float64 operations in the same order). With
    k <= 16 centroids a scalar loop with ``bisect`` beats any sequence of numpy calls, whose
    overhead dominates."""
    n = xs.size
    prefix = _prefix(xs)
    tol_scaled = 0.0
    if tol > 0:
        dev = xs - prefix[n] / n
        np.square(dev, out=dev)
        tol_scaled = tol * float(np.cumsum(dev)[-1]) / n
    xl = xs.tolist()
    if ws is None:
        s, cnt = prefix.tolist(), None
    else:  # weighted means: sum w x over sum w of each run; a run of weight 0 counts as empty
        s, cnt = _prefix(ws * xs).tolist(), _prefix(ws).tolist()
    c = sorted(c.tolist())
    bounds = None
    iters = 0
    for iters in range(1, max_iter + 1):
        # points <= the midpoint (c_j + c_{j+1}) / 2 belong to clusters <= j
        new_bounds = [bisect_right(xl, (lo + hi) * 0.5) for lo, hi in zip(c, c[1:])]
        if new_bounds == bounds:
            iters -= 1  # this pass changed nothing: the previous one reached the fixed point
            break
        bounds = new_bounds
        old = c[:]
        a = 0
        if cnt is None:
            for j, b in enumerate(new_bounds):
                if b > a:  # empty clusters keep their centroid
                    c[j] = (s[b] - s[a]) / (b - a)
                a = b
            if n > a:
                c[-1] = (s[n] - s[a]) / (n - a)
        else:
            for j, b in enumerate(new_bounds + [n]):
                wsum = cnt[b] - cnt[a]
                if wsum > 0:
                    c[j] = (s[b] - s[a]) / wsum
                a = b
        shift = 0.0
        for new, prev in zip(c, old):
            shift += (new - prev) ** 2
        c.sort()  # only empty clusters can break the order
        if tol > 0 and shift <= tol_scaled:
            break
    return np.array(c, dtype=np.float64), iters


def kmeans_1d(
    x: torch.Tensor,
    k: int,
    *,
    init: str = "kmeans++",
    max_iter: int = 300,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
    init_centroids: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """k-means of the values of ``x`` (any shape, flattened). Returns (sorted centroids fp32 [k],
    number of Lloyd iterations run). Arithmetic is float64 internally.

    ``sample_weight`` (x's shape, >= 0): weighted k-means, as scikit-learn's ``sample_weight``:
    each centroid is the weighted mean of its points and k-means++ draws with probability
    proportional to weight x D^2; the assignment (nearest centroid) and ``tol``'s variance are
    unweighted. A cluster whose points all have weight 0 keeps its centroid.

    ``tol``: 0 runs Lloyd to its fixed point; ``tol > 0`` stops as scikit-learn does (module
    docstring). ``init_centroids`` overrides ``init`` (used by the tests to compare with a naive
    loop).
    """
    args = dict(init=init, max_iter=max_iter, tol=tol, generator=generator, init_centroids=init_centroids,
                sample_weight=sample_weight)
    no_centroids = k < 1 if init_centroids is None else init_centroids.numel() == 0
    if x.device.type != "cpu" or x.dtype not in _NUMPY_DTYPES or x.numel() == 0 or no_centroids:
        return _kmeans_1d_torch(x, k, **args)
    if sample_weight is not None and (sample_weight.device.type != "cpu" or sample_weight.numel() != x.numel()):
        return _kmeans_1d_torch(x, k, **args)
    flat = x.detach().reshape(-1)
    xs = (flat if flat.dtype == torch.float32 else flat.to(torch.float32)).numpy().astype(np.float64)
    ws = None
    if sample_weight is None:
        xs.sort()  # NaNs last, so finite ends mean finite values
    else:  # a stable sort, like the torch path's: equal values keep their weights in order
        order = np.argsort(xs, kind="stable")
        xs = xs[order]
        ws = sample_weight.detach().reshape(-1).to(torch.float64).numpy()[order]
        if not np.isfinite(ws).all():
            return _kmeans_1d_torch(x, k, **args)
    lo = int(np.searchsorted(xs, 0.0, side="left"))
    if not (np.isfinite(xs[0]) and np.isfinite(xs[-1])) \
            or (lo < xs.size and xs[lo] == 0 and _has_negative_zero(xs[lo:np.searchsorted(xs, 0.0, side="right")])):
        return _kmeans_1d_torch(x, k, **args)
    if init_centroids is not None:
        c = init_centroids.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
        if not np.isfinite(c).all() or _has_negative_zero(c):
            return _kmeans_1d_torch(x, k, **args)
    elif init == "quantile":
        n = xs.size
        c = xs[np.minimum(((np.arange(k, dtype=np.float64) + 0.5) * n / k).astype(np.int64), n - 1)]
    elif init == "kmeans++":
        c = _kmeanspp_init_np(xs, k, generator, ws)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    c, iters = _lloyd_sorted(xs, c, max_iter, tol, ws)
    return torch.from_numpy(c.astype(np.float32)), iters


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value (ties to the lower index)."""
    if x.device.type == "cpu" and centroids.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
            and centroids.dtype in (torch.float32, torch.float64):
        c = centroids.detach().numpy().astype(np.float64)
        mid = (c[:-1] + c[1:]) * 0.5
        xv = x.detach().numpy().astype(np.float64)
        if not np.isnan(mid).any() and not np.isnan(xv.sum()):  # NaNs: torch and numpy order them apart
            return torch.from_numpy(np.asarray(np.searchsorted(mid, xv, side="left")))
    mid = (centroids[:-1].to(torch.float64) + centroids[1:].to(torch.float64)) * 0.5
    return torch.searchsorted(mid, x.to(torch.float64).contiguous(), right=False)
