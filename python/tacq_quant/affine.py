"""Uniform asymmetric (affine) quantization: scale/zero fitting with the MSE clipping search.

A b-bit affine code q in [0, 2^b - 1] decodes to ``w = (q - zero) * scale`` (docs/format.md,
decoder ``affine``). Parameters are fitted per output row over a group of input columns.

Fitting follows the GPTQ reference quantizer (``find_params`` with ``mse=True``), which TACQ uses:

* the range always contains 0: ``xmin = min(row min, 0)``, ``xmax = max(row max, 0)``; an all-zero
  row gets the range [-1, 1];
* ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``;
* clipping search: for shrink factors ``p = 1 - i / grid``, ``i = 0 .. int(maxshrink * grid) - 1``
  (grid 100, maxshrink 0.8: p from 1.00 down to 0.21), the range ``[p*xmin, p*xmax]`` is tried and
  the one with the smallest ``sum |Q(x) - x|^norm`` (norm 2.4) per row is kept (first best wins).

One deliberate difference from the reference: every candidate scale is rounded to fp16 *before*
its zero point and its error are computed. The checkpoint stores fp16 scales and zeros, so the
values the search compares (and that GPTQ propagates errors from) are exactly what a reader of
the checkpoint decodes. Zero points are small integers, exact in fp16.
"""

from __future__ import annotations

import torch

# Smallest positive fp16 (subnormal): a scale below it would round to 0 on disk.
MIN_FP16_SCALE = 2.0**-24


def max_code(bits: int) -> int:
    return 2**bits - 1


def round_scale_fp16(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 value of the fp16 that the checkpoint will store (never 0)."""
    return scale.clamp_min(MIN_FP16_SCALE).to(torch.float16).to(torch.float32)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` for broadcastable ``scale``/``zero``: clamp(round(x/scale) + zero)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, max_code(bits))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32, the same expression (and rounding) as the reference decoder."""
    return (codes.to(torch.float32) - zero) * scale


def fit_affine(
    x: torch.Tensor,
    bits: int,
    *,
    clip_search: bool = True,
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one (scale, zero) per row of ``x`` [R, C]; returns fp32 tensors [R] holding fp16 values.

    ``clip_search=False`` is plain min-max (the p = 1 candidate only).
    """
    x = x.to(torch.float32)
    maxq = max_code(bits)
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)

    def candidate(p: float):
        s = round_scale_fp16((p * xmax - p * xmin) / maxq)
        z = torch.round(-(p * xmin) / s)
        return s, z

    scale, zero = candidate(1.0)
    if not clip_search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    residual = torch.empty_like(x)
    for i in range(int(maxshrink * grid)):
        s, z = candidate(1 - i / grid)
        sc, zc = s[:, None], z[:, None]
        # quantize_codes then dequantize_codes, in place in one buffer: this loop is most of a
        # GPTQ/TACQ run's quantizer time on CPU, and exp(norm * log|r|) is ~3x faster than pow
        # there (log 0 = -inf gives exp 0, as it should).
        torch.div(x, sc, out=residual)
        residual.round_().add_(zc).clamp_(0, maxq).sub_(zc).mul_(sc).sub_(x).abs_()
        err = residual.log_().mul_(norm).exp_().sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def fill_kept_with_row_mean(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` with kept entries replaced by the mean of the row's non-kept entries.

    This is how TACQ (and SpQR) keep the 16-bit weights out of the scale fit: they neither widen
    the range nor pull the clipping search. A row with every entry kept gets mean 0.
    """
    if keep is None or not bool(keep.any()):
        return x
    free = (~keep).to(x.dtype)
    mean = (x * free).sum(dim=1, keepdim=True) / free.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(keep, mean, x)
