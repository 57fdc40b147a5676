"""GPTQ for one weight matrix, with a pluggable column quantizer and an optional keep-mask.

Algorithm (Frantar et al. 2022, as in the IST-DASLab reference that TACQ and CLAQ build on):

1. ``H = 2/n sum_t x_t x_t^T`` over the n calibration tokens seen by the layer (fp32; the scale of
   H does not change the result). Inputs that never fire (``H_jj = 0``) get ``H_jj = 1`` and their
   weights are set to 0.
2. Optional act-order: columns are processed by decreasing ``H_jj``.
3. Damping ``H += percdamp * mean(diag H) * I``; if the Cholesky factorisation fails the same
   amount is added again (up to ``max_damp_tries`` times). ``Hinv = chol_upper(H^-1)``.
4. Columns are quantized one by one; the error ``(w - q) / Hinv_jj`` of column j is propagated to
   the columns after it inside a block of ``blocksize`` columns, and to the columns after the
   block once per block (lazy batch updates).

The keep-mask (TACQ, and CLAQ's outlier reservation): a kept weight is stored at its *current*,
GPTQ-updated value (the original plus the compensation it received from earlier columns), its
error is 0, so nothing is propagated from it; the scale fit of the affine quantizer ignores kept
weights (they are replaced by the row mean of the non-kept weights of the group before fitting).

The column quantizer decides what a column becomes. :class:`AffineColumnQuantizer` is the uniform
asymmetric grid of GPTQ/TACQ (per row, or per group of columns); CLAQ plugs in its k-means
quantizer (:mod:`tacq_quant.claq`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tacq_kernels import SegmentData

from .affine import dequantize_codes, fill_kept_with_row_mean, fit_affine, quantize_codes
from .quantized_weight import QuantizedWeight


class HessianAccumulator:
    """Accumulates ``sum x x^T`` (fp32) over the rows of the inputs of one linear layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xtx.addmm_(x.t(), x)
        self.n_tokens += x.shape[0]

    def add_xtx(self, xtx: torch.Tensor, n_tokens: int) -> None:
        self.xtx += xtx
        self.n_tokens += n_tokens

    def hessian(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return self.xtx * (2.0 / self.n_tokens)


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X W^T - X W_hat^T||_F / ||X W^T||_F`` from ``H`` proportional to ``X^T X``."""
    w = w.to(torch.float32)
    delta = w - w_hat.to(torch.float32)
    num = ((delta @ hessian) * delta).sum()
    den = ((w @ hessian) * w).sum()
    return float(torch.sqrt(num.clamp_min(0) / den.clamp_min(1e-30)))


class ColumnQuantizer(Protocol):
    """What the GPTQ loop needs from a quantizer (columns are in processing order)."""

    #: columns per parameter group, or None when the quantizer has no groups to fit in the loop
    group_size: int | None

    def prepare(self, w: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Called once before the loop with the (permuted) weight and keep-mask."""

    def fit_group(self, col: int, w: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Fit the parameters of the group starting at ``col`` on its current columns ``w``."""

    def quantize_column(self, col: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Quantize column ``col`` (current values ``w`` [N]); return the dequantized column and an
        optional bool [N] of positions the quantizer itself keeps in 16 bits (CLAQ's outliers)."""

    def segments(self) -> tuple[list[SegmentData], torch.Tensor | None]:
        """Dense segments in storage order, and the storage order as positions of processed
        columns (None: storage order = processing order)."""


class AffineColumnQuantizer:
    """Uniform asymmetric b-bit grid with one scale/zero per output row and group of columns.

    ``group_size = -1`` (or >= K) is one group per row, fitted once on the whole (original) weight
    before any column is quantized; otherwise a group is fitted when the loop reaches its first
    column, on the current (error-compensated) values, as GPTQ does without static groups.
    """

    def __init__(self, bits: int, group_size: int = -1, clip_search: bool = True,
                 grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4):
        if bits not in (2, 3, 4):
            raise ValueError(f"affine bits must be 2, 3 or 4, got {bits}")
        self.bits = bits
        self.requested_group_size = group_size
        self.fit_kwargs = dict(clip_search=clip_search, grid=grid, maxshrink=maxshrink, norm=norm)
        self.group_size: int | None = None

    def prepare(self, w: torch.Tensor, keep: torch.Tensor | None) -> None:
        n, k = w.shape
        g = self.requested_group_size
        self.group_size = k if g is None or g <= 0 or g >= k else g
        n_groups = -(-k // self.group_size)
        self.codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
        self.scale = torch.zeros(n_groups, n, dtype=torch.float32, device=w.device)
        self.zero = torch.zeros(n_groups, n, dtype=torch.float32, device=w.device)

    def fit_group(self, col: int, w: torch.Tensor, keep: torch.Tensor | None) -> None:
        s, z = fit_affine(fill_kept_with_row_mean(w, keep), self.bits, **self.fit_kwargs)
        g = col // self.group_size
        self.scale[g], self.zero[g] = s, z

    def quantize_column(self, col: int, w: torch.Tensor):
        g = col // self.group_size
        s, z = self.scale[g], self.zero[g]
        q = quantize_codes(w, s, z, self.bits)
        self.codes[:, col] = q.to(torch.uint8)
        return dequantize_codes(q, s, z), None

    def segments(self):
        seg = SegmentData(bits=self.bits, codes=self.codes, decoder="affine", scale=self.scale,
                          zero=self.zero, group_size=self.group_size)
        return [seg], None


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    #: the loop's dequantized weight (original column order; kept weights at their kept value)
    dequantized: torch.Tensor
    info: dict = field(default_factory=dict)


def inverse_hessian_factor(h: torch.Tensor, percdamp: float, max_damp_tries: int = 100) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; the damping is added again while it fails.

    Returns the factor and the total damping used (in units of mean(diag H)).
    """
    h = h.clone()
    k = h.shape[0]
    diag = torch.arange(k, device=h.device)
    damp = percdamp * torch.mean(torch.diag(h))
    if not bool(damp > 0):
        damp = torch.tensor(percdamp if percdamp > 0 else 1e-2, device=h.device)
    for tries in range(1, max_damp_tries + 1):
        h[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            factor, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                return factor, tries * percdamp
    raise RuntimeError(f"Cholesky of the Hessian failed even with {max_damp_tries}x damping")


#: columns per sub-block of the GPTQ loop (see gptq_quantize)
SUB_BLOCK = 32


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    keep_mask: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight`` [N, K] with GPTQ. ``hessian`` [K, K] from :class:`HessianAccumulator`.

    ``keep_mask`` (bool [N, K], original column order) marks weights kept in 16 bits.
    ``importance`` (fp32 [N, K], original column order): per-weight weights for a quantizer that
    fits with them (CLAQ's weighted k-means), handed to its ``prepare``. Returns the
    codes and decoders (:class:`QuantizedWeight`, with the storage permutation and the kept
    weights at their GPTQ-updated values) and the loop's dequantized weight.
    """
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}], got {tuple(h.shape)}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    keep = None if keep_mask is None else keep_mask.to(device=w.device, dtype=torch.bool)
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    hinv, damp_used = inverse_hessian_factor(h, percdamp)
    del h

    if importance is None:
        quantizer.prepare(w, keep)
    else:
        imp = importance.to(device=w.device, dtype=torch.float32)
        quantizer.prepare(w, keep, importance=imp if perm is None else imp[:, perm])
    q_all = torch.zeros_like(w)
    kept_all = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        gs = quantizer.group_size
        # Sub-blocks of SUB_BLOCK columns: a column's error updates the rest of its sub-block at
        # once (a rank-1 update) and the rest of the block with one matmul per sub-block, instead
        # of a rank-1 update of the whole rest of the block per column (4x less memory traffic
        # at 128/32; the same sums, reassociated). A sub-block ends at a group start, so that
        # fit_group sees every column of its group updated as before.
        s0 = 0
        while s0 < i2 - i1:
            s1 = min(s0 + SUB_BLOCK, i2 - i1)
            if gs is not None:
                s1 = min(s1, ((i1 + s0) // gs + 1) * gs - i1)
            for i in range(s0, s1):
                col = i1 + i
                if gs is not None and col % gs == 0:
                    end = min(col + gs, k)
                    # current values: this block's updated columns, then the not yet updated ones after it
                    group = w1[:, i:end - i1] if end <= i2 else torch.cat([w1[:, i:], w[:, i2:end]], dim=1)
                    quantizer.fit_group(col, group, None if keep is None else keep[:, col:end])
                wc = w1[:, i]
                q, own_keep = quantizer.quantize_column(col, wc)
                kept = own_keep
                if keep is not None:
                    kept = keep[:, col] if kept is None else (kept | keep[:, col])
                if kept is not None:
                    q = torch.where(kept, wc, q)
                    kept_all[:, col] = kept
                q1[:, i] = q
                e = (wc - q) / hinv1[i, i]
                w1[:, i:s1] -= e.unsqueeze(1) * hinv1[i, i:s1].unsqueeze(0)
                err1[:, i] = e
            if s1 < i2 - i1:
                w1[:, s1:] -= err1[:, s0:s1] @ hinv1[s0:s1, s1:]
            s0 = s1
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    segments, order = quantizer.segments()
    storage_perm = perm
    if order is not None:
        base = perm if perm is not None else torch.arange(k, device=w.device)
        storage_perm = base[order.to(w.device)]
    if perm is not None:
        inv = torch.argsort(perm)
        q_all = q_all[:, inv]
        kept_all = kept_all[:, inv]
    any_kept = bool(kept_all.any())
    qw = QuantizedWeight(
        segments=segments,
        perm=storage_perm,
        keep_mask=kept_all if any_kept else None,
        kept_values=q_all if any_kept else None,  # at kept positions q_all holds the kept value
        info={"damp": damp_used},
    )
    return GPTQResult(weight=qw, dequantized=q_all, info={"damp": damp_used, "dead_inputs": int(dead.sum())})
