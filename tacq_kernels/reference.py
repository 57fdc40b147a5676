"""Reference math in pure PyTorch: the CPU path and the oracle every kernel test compares with.

    W_effective = dequant(D) + S            [N, K], original column order
    y           = x @ W_effective^T + bias

All arithmetic is done in fp32 (fp16 scales, zeros, codebooks and sparse values are exact in
fp32); the result is cast to the dtype of ``x``.
"""

from __future__ import annotations

import torch

from .format import LayerSpec, PackedLayer, SegmentSpec
from .packing import unpack_codes


def dequantize_segment(seg: SegmentSpec, tensors: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Decode one segment to fp32 [N, k]; ``tensors`` are the segment's (``q2``, ``scale``, ...)."""
    codes = unpack_codes(tensors, seg.bits, seg.k)  # [N, k] int64
    if seg.decoder == "affine":
        group = torch.arange(seg.k, device=codes.device) // seg.group_size
        scale = tensors["scale"].float()[group].t()  # [N, k]
        zero = tensors["zero"].float()[group].t()
        return (codes.float() - zero) * scale
    lut = tensors["lut"].float()  # [k, 2^b]
    return torch.gather(lut, 1, codes.t()).t()


def dequantize_dense(layer: PackedLayer) -> torch.Tensor:
    """The dense part D of a layer, decoded to fp32 [N, K] in the original column order."""
    spec = layer.spec
    parts = [dequantize_segment(seg, layer.segment_tensors(i), spec.out_features) for i, seg in enumerate(spec.segments)]
    dense = torch.cat(parts, dim=1)
    if layer.perm is None:
        return dense
    out = torch.empty_like(dense)
    out[:, layer.perm.long()] = dense
    return out


def sparse_correction(layer: PackedLayer) -> torch.Tensor:
    """The sparse correction S as a dense fp32 [N, K] tensor."""
    spec = layer.spec
    t = layer.tensors
    row_ptr = t["sparse_row_ptr"].long()
    rows = torch.repeat_interleave(torch.arange(spec.out_features, device=row_ptr.device), row_ptr.diff())
    out = torch.zeros(spec.out_features, spec.in_features, dtype=torch.float32, device=row_ptr.device)
    out.index_put_((rows, t["sparse_col"].long()), t["sparse_val"].float(), accumulate=True)
    return out


def dequantize(layer: PackedLayer) -> torch.Tensor:
    """The effective weight D + S, fp32 [N, K]."""
    return dequantize_dense(layer) + sparse_correction(layer)


def linear(x: torch.Tensor, layer: PackedLayer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (D + S)^T + bias for x [..., K]; fp32 arithmetic, result in x.dtype.

    ``weight`` may pass a precomputed :func:`dequantize` result (fp32 [N, K]) to skip decoding.
    """
    spec: LayerSpec = layer.spec
    if x.shape[-1] != spec.in_features:
        raise ValueError(f"{layer.name or 'layer'}: input has {x.shape[-1]} features, expected {spec.in_features}")
    w = dequantize(layer) if weight is None else weight
    y = x.float() @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)
