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
"""

from __future__ import annotations

import torch


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


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value (ties to the lower index)."""
    mid = (centroids[:-1].to(torch.float64) + centroids[1:].to(torch.float64)) * 0.5
    return torch.searchsorted(mid, x.to(torch.float64).contiguous(), right=False)
