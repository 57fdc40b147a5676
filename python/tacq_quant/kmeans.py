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
:func:`assign_nearest`. The iterations stop when no point changes cluster (a fixed point), or
after ``max_iter``. Empty clusters keep their previous centroid.

Initialisation: ``"kmeans++"`` (D^2 sampling from a seeded generator, like scikit-learn's
default that CLAQ's authors use) or ``"quantile"`` (centroid j starts at the ``(j + 1/2)/k``
quantile: deterministic, no random numbers).

Two implementations compute the same thing. CLAQ calls these functions once per weight column
on columns of a few hundred to a few thousand values, where torch's per-operation overhead on
tiny tensors dominates. So for CPU tensors the values are sorted in numpy and the Lloyd loop runs
on Python floats (IEEE doubles: the same float64 operations in the same order, ``bisect`` for
the search, a sequential prefix sum like torch's CPU ``cumsum``). The k-means++ draws still come
from the same generator through the same torch calls: ``torch.randint``, and for each
``torch.multinomial(p, 1)`` what ATen runs for it (``q = exponential_(1)`` of p's shape, then
the first argmax of ``p / q``, taken here in numpy) on bit-identical probabilities (their
normaliser summed by torch), so the draws and the generator's state afterwards are those of the
torch path. Other devices, and the rare inputs where the two could differ at all (non-finite
values; ``-0.0``, whose order among equal zeros no sort guarantees; float64 input), use the torch
implementation ``_kmeans_1d_torch``. ``tests/test_quant_claq.py`` checks that both give the same
centroids bit for bit, the same iteration counts and the same generator state.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import torch

# float32 or narrower: the values are multiples of 2^-149, so no float64 mean of them underflows
# to -0.0 (the proof that the numpy path never meets a signed-zero tie it could order differently)
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kmeanspp_init(xs: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    n = xs.numel()
    first = torch.randint(n, (1,), generator=generator, device=xs.device)
    centers = [xs[first]]
    d2 = (xs - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        if not bool(total > 0):  # fewer distinct values than clusters: repeat a centre
            centers.append(centers[-1])
            continue
        idx = torch.multinomial(d2 / total, 1, generator=generator)
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
    generator: torch.Generator | None = None,
    init_centroids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """:func:`kmeans_1d` in torch operations on ``x``'s device: the reference implementation."""
    xs = torch.sort(x.reshape(-1).to(torch.float64)).values
    n = xs.numel()
    if n == 0:
        raise ValueError("k-means of an empty column")
    if init_centroids is not None:
        c = init_centroids.to(device=xs.device, dtype=torch.float64).reshape(-1)
    elif init == "quantile":
        c = _quantile_init(xs, k)
    elif init == "kmeans++":
        c = _kmeanspp_init(xs, k, generator)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    c = torch.sort(c).values
    prefix = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
    prefix[1:] = torch.cumsum(xs, 0)
    zero = torch.zeros(1, dtype=torch.long, device=xs.device)
    last = torch.full((1,), n, dtype=torch.long, device=xs.device)
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
        count = (ends - starts).to(torch.float64)
        sums = prefix[ends] - prefix[starts]
        c = torch.where(count > 0, sums / count.clamp_min(1), c)
        c = torch.sort(c).values  # only empty clusters can break the order
    return c.to(torch.float32), iters


def _has_negative_zero(a: np.ndarray) -> bool:
    return bool(np.any((a == 0) & np.signbit(a)))


def _kmeanspp_init_np(xs: np.ndarray, k: int, generator: torch.Generator | None) -> np.ndarray:
    """:func:`_kmeanspp_init` on numpy values: the same draws from ``generator``.

    ``torch.multinomial(p, 1)`` is, in ATen (``multinomial_out``, the path for one sample), the
    argmax (first on ties) of ``p / q`` with ``q = empty_like(p).exponential_(1, generator)``
    after checks that draw nothing; here ``q`` is drawn the same way and the argmax taken in
    numpy. The tests compare the draws and the generator state with the torch path.
    """
    n = xs.size
    first = torch.randint(n, (1,), generator=generator)
    centers = [xs[int(first)]]
    d2 = (xs - centers[0]) ** 2
    d2_t = torch.from_numpy(d2)  # shares d2's memory
    q_t = torch.empty(n, dtype=torch.float64)
    q = q_t.numpy()
    tmp = np.empty_like(xs)
    for i in range(1, k):
        total = float(d2_t.sum())  # torch's summation order: the same probabilities d2 / total
        if not total > 0:  # fewer distinct values than clusters: repeat a centre
            centers.append(centers[-1])
            continue
        q_t.exponential_(1, generator=generator)
        np.divide(d2, total, out=tmp)
        np.divide(tmp, q, out=tmp)
        c = xs[int(np.argmax(tmp))]
        centers.append(c)
        if i == k - 1:
            break  # the distances to the last centre are never used
        np.subtract(xs, c, out=tmp)
        np.square(tmp, out=tmp)
        np.minimum(d2, tmp, out=d2)
    return np.array(centers, dtype=np.float64)


def _lloyd_sorted(xs: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """The Lloyd loop of :func:`_kmeans_1d_torch` on the sorted values ``xs``, in Python floats
    (IEEE doubles: the same float64 operations in the same order). With k <= 16 centroids a
    scalar loop with ``bisect`` beats any sequence of numpy calls, whose overhead dominates."""
    n = xs.size
    prefix = np.empty(n + 1, dtype=np.float64)
    prefix[0] = 0.0
    np.cumsum(xs, out=prefix[1:])  # sequential, like torch's CPU cumsum
    xl, s = xs.tolist(), prefix.tolist()
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
        a = 0
        for j, b in enumerate(new_bounds):
            if b > a:  # empty clusters keep their centroid
                c[j] = (s[b] - s[a]) / (b - a)
            a = b
        if n > a:
            c[-1] = (s[n] - s[a]) / (n - a)
        c.sort()  # only empty clusters can break the order
    return np.array(c, dtype=np.float64), iters


def kmeans_1d(
    x: torch.Tensor,
    k: int,
    *,
    init: str = "kmeans++",
    max_iter: int = 300,
    generator: torch.Generator | None = None,
    init_centroids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """k-means of the values of ``x`` (any shape, flattened). Returns (sorted centroids fp32 [k],
    number of Lloyd iterations run). Arithmetic is float64 internally.

    ``init_centroids`` overrides ``init`` (used by the tests to compare with a naive loop).
    """
    args = dict(init=init, max_iter=max_iter, generator=generator, init_centroids=init_centroids)
    no_centroids = k < 1 if init_centroids is None else init_centroids.numel() == 0
    if x.device.type != "cpu" or x.dtype not in _NUMPY_DTYPES or x.numel() == 0 or no_centroids:
        return _kmeans_1d_torch(x, k, **args)
    flat = x.detach().reshape(-1)
    xs = (flat if flat.dtype == torch.float32 else flat.to(torch.float32)).numpy().astype(np.float64)
    xs.sort()  # NaNs last, so finite ends mean finite values
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
        c = _kmeanspp_init_np(xs, k, generator)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    c, iters = _lloyd_sorted(xs, c, max_iter)
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
