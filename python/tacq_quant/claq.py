"""CLAQ: column-level adaptive quantization (Wang et al. 2024, arXiv 2405.17233).

CLAQ is the GPTQ column loop (act-order on) with the uniform grid replaced by a per-column
k-means codebook. A "column" is ``W[:, j]``: all output rows that read input feature j.
The rules, as the authors' code (fayuge/CLAQ, claq.py and quant.py) does them:

* **Codebook.** Inside the loop, column j's *current* (error-compensated) values get their own
  ``2^b`` centroids from 1-D k-means (unweighted, all N values, outliers included); every weight
  becomes its nearest centroid. Our k-means is :func:`tacq_quant.kmeans.kmeans_1d` with
  k-means++ initialisation, ``max_iter=300`` and scikit-learn's stopping rule at its default
  ``tol=1e-4``, the settings of the authors' ``sklearn.cluster.KMeans`` call.
* **Outlier order.** Before the loop, on the (act-order permuted) weight: ``m = mean |W|`` over
  the whole matrix, and ``count_j = #{i : |W_ij| >= 13 m}``. Columns are ranked by count,
  highest first (ties: earlier act-order column first; the authors' unstable sort leaves ties
  unspecified).
* **Adaptive precision (AP)** for a fractional target X: X in (2, 3): the top
  ``round((X - 2) / 2 * K)`` columns get 4 bits, the rest 2 bits; X in (3, 4): the top
  ``round((X - 3) * K)`` get 4 bits, the rest 3 bits. An integer X gives every column X bits.
  The allocation is per matrix, so the mean code bits is X up to rounding of one column.
* **Outlier reservation (OR)**, optional: the top ``round(0.1 K)`` columns by count reserve
  ``r = 1.4 %``, the others ``r = 0.4 %``. In a column of N values sorted in descending order
  ``s_0 >= s_1 >= ...``, the weights ``>= s_{round(N r)}`` and ``<= s_{round(N (1 - r))}`` keep
  their current value in 16 bits (error 0, nothing propagated; the codebook is not refitted
  without them). That is ``round(N r) + 1`` values at the top and ``N - round(N (1 - r))`` at
  the bottom (n = 4096: 58 + 57 and 17 + 16, as in the authors' code). We select by rank, so ties
  never change the count. Column j uses its own ratio ``r_j``; the authors' code reads
  ``out_per[i]`` with i the index inside the 128-column block, which reuses the ratios of the
  first 128 columns in every block, a bug we do not reproduce.

**Kept weights** (TACQ over CLAQ codebooks, ``--method tacq --base claq``): when the GPTQ loop
passes a keep-mask, a column's k-means is fitted on its *non-kept* current values only (a kept
weight is stored exactly, so a centroid spent on it would be wasted), and the outlier counts that
rank columns for AP and OR count only non-kept weights. The loop itself stores kept weights at
their current value and propagates no error from them (:func:`tacq_quant.gptq.gptq_quantize`).

Storage: the permutation puts the 4-bit columns first (in act-order among themselves) and the
others after them, so each bit-width is one contiguous LUT segment; the codebooks follow their
columns. The loop still processes columns in act-order: the storage order is a relabelling of
already-quantized, independent columns.
"""

from __future__ import annotations

import torch

from tacq_kernels import SegmentData

from .kmeans import assign_nearest, kmeans_1d

OUTLIER_THRESHOLD = 13.0
TOP_COLUMN_SHARE = 0.1
RESERVE_TOP = 0.014
RESERVE_REST = 0.004
KMEANS_TOL = 1e-4  # scikit-learn's default, which the authors' KMeans call keeps


def validate_claq_bits(bits: float) -> None:
    if not 2 <= bits <= 4:
        raise ValueError(f"CLAQ bits must be in [2, 4] (e.g. 2, 2.1, 2.2, 3, 3.1), got {bits}")


def outlier_counts(w: torch.Tensor, threshold: float = OUTLIER_THRESHOLD,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per column: how many weights have ``|W_ij| >= threshold * mean |W|`` (whole-matrix mean);
    weights marked in ``keep`` (stored exactly) are not counted."""
    m = w.abs().mean()
    big = w.abs() >= threshold * m
    if keep is not None:
        big &= ~keep
    return big.sum(dim=0)


def allocate_bits(counts: torch.Tensor, target: float) -> torch.Tensor:
    """Bits per column (AP) from outlier counts, for a target mean in [2, 4]."""
    validate_claq_bits(target)
    k = counts.numel()
    if float(target).is_integer():
        return torch.full((k,), int(target), dtype=torch.long, device=counts.device)
    if target < 3:
        frac, base = (target - 2) / 2, 2
    else:
        frac, base = target - 3, 3
    order = torch.argsort(counts, descending=True, stable=True)
    bits = torch.full((k,), base, dtype=torch.long, device=counts.device)
    bits[order[: round(frac * k)]] = 4
    return bits


def reserve_ratios(counts: torch.Tensor) -> torch.Tensor:
    """OR ratio per column: 1.4 % for the top 10 % of columns by outlier count, 0.4 % otherwise."""
    k = counts.numel()
    order = torch.argsort(counts, descending=True, stable=True)
    ratio = torch.full((k,), RESERVE_REST, dtype=torch.float64)
    ratio[order[: round(TOP_COLUMN_SHARE * k)].cpu()] = RESERVE_TOP
    return ratio


def reserved_counts(n: int, ratio: float) -> tuple[int, int]:
    """(kept at the top, kept at the bottom) of a column of n values for ratio r."""
    top = min(n, round(n * ratio) + 1)
    bottom = max(0, n - round(n * (1 - ratio)))
    return top, min(bottom, n - top)


class KMeansColumnQuantizer:
    """The CLAQ column quantizer for :func:`tacq_quant.gptq.gptq_quantize`."""

    group_size = None

    def __init__(self, bits: float, reserve_outliers: bool = False, kmeans_init: str = "kmeans++",
                 max_iter: int = 300, seed: int = 0, tol: float = KMEANS_TOL):
        validate_claq_bits(bits)
        self.target_bits = bits
        self.reserve_outliers = reserve_outliers
        self.kmeans_init = kmeans_init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed

    def prepare(self, w: torch.Tensor, keep: torch.Tensor | None, importance: torch.Tensor | None = None) -> None:
        """``importance`` (fp32 [N, K] >= 0, in ``w``'s column order): weights of the k-means
        fits (column j's codebook minimises sum_i importance_ij (w_ij - c)^2); None: unweighted."""
        n, k = w.shape
        if importance is not None:
            if importance.shape != w.shape:
                raise ValueError(f"importance must be {tuple(w.shape)}, got {tuple(importance.shape)}")
            if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
                raise ValueError("k-means importance weights must be finite and >= 0")
        self.importance = None if importance is None else importance.to(device=w.device, dtype=torch.float32)
        counts = outlier_counts(w, keep=keep)
        self.keep = keep if keep is not None and bool(keep.any()) else None
        self.col_bits = allocate_bits(counts, self.target_bits).cpu()
        self.col_bits_list = self.col_bits.tolist()
        self.reserve = None
        if self.reserve_outliers:
            self.reserve = [reserved_counts(n, r) for r in reserve_ratios(counts).tolist()]
        self.codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
        self.luts = torch.zeros(k, 16, dtype=torch.float32, device=w.device)
        # k-means++ draws come from a generator seeded per matrix: reruns give the same codebooks
        self.generator = torch.Generator(device=w.device).manual_seed(self.seed)
        self.iterations = 0

    def fit_group(self, col, w, keep):  # no groups: one codebook per column
        pass

    def quantize_column(self, col: int, w: torch.Tensor):
        bits = self.col_bits_list[col]
        fit = w
        sw = None if self.importance is None else self.importance[:, col]
        if self.keep is not None:
            free = ~self.keep[:, col]
            if bool(free.any()) and not bool(free.all()):
                fit = w[free]  # kept weights are stored exactly: no centroid is spent on them
                sw = None if sw is None else sw[free]
        if sw is not None and not bool(sw.sum() > 0):
            sw = None  # no weight anywhere: the unweighted fit
        c, iters = kmeans_1d(fit, 2**bits, init=self.kmeans_init, max_iter=self.max_iter, tol=self.tol,
                              generator=self.generator, sample_weight=sw)
        self.iterations += iters
        c = torch.sort(c.to(torch.float16).to(torch.float32)).values  # the codebook as stored (fp16)
        code = assign_nearest(w, c)
        self.codes[:, col] = code.to(torch.uint8)
        self.luts[col, : 2**bits] = c
        q = c[code]
        if self.reserve is None:
            return q, None
        top, bottom = self.reserve[col]
        order = torch.argsort(w, descending=True, stable=True)
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[order[:top]] = True
        if bottom:
            keep[order[-bottom:]] = True
        return q, keep

    def segments(self):
        k = self.codes.shape[1]
        order_parts, segments = [], []
        for b in sorted(set(self.col_bits_list), reverse=True):  # 4-bit columns first
            cols = torch.nonzero(self.col_bits == b).flatten().to(self.codes.device)
            order_parts.append(cols)
            segments.append(SegmentData(bits=b, codes=self.codes[:, cols], decoder="lut",
                                        lut=self.luts[cols, : 2**b]))
        order = torch.cat(order_parts)
        identity = torch.equal(order.cpu(), torch.arange(k))
        return segments, None if identity else order
