"""The result of quantizing one weight matrix, and its conversion to a format-v1 layer.

Every method (RTN, GPTQ, TACQ, CLAQ) produces a :class:`QuantizedWeight`: dense codes in one or
more column segments (stored in permuted column order when there is a permutation), plus the
positions and values of the weights kept in 16 bits. :meth:`QuantizedWeight.pack` writes the
sparse correction ``S = W_kept - dequant(D)`` at exactly the kept positions (explicit entries,
also where the difference happens to be 0, so ``nnz`` always equals the number of kept weights),
and :meth:`QuantizedWeight.effective_weight` is what a reader of the checkpoint computes.

Precision of kept weights. The checkpoint stores ``S`` in fp16 and a reader adds it to the fp32
dense decode ``d``, so a kept weight ``w`` comes back as ``d + fp16(w - d)``.

* Affine segments (RTN, GPTQ, TACQ): the dense code at a kept position is free (the sparse part
  overrides it), so it is set to the row's zero point, which decodes to exactly ``0.0``. Then
  ``S = fp16(w)`` and the checkpoint reproduces the kept weight **exactly as its fp16 value**:
  ``d + S == fp16(w)`` bit for bit in fp32.
* LUT segments (CLAQ): no code decodes to 0 in general, so the code is the nearest centroid ``c``
  and the kept weight comes back as ``c + fp16(w - c)``: the error is the fp16 rounding of the
  difference, at most ``2^-11 |w - c|`` (``2^-25`` absolute when the difference is subnormal),
  which is no larger than fp16's own rounding of ``w`` whenever ``|w - c| <= |w|``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tacq_kernels import PackedLayer, SegmentData, build_layer
from tacq_kernels.format import COL_DTYPES, LayerSpec
from tacq_kernels.reference import dequantize, dequantize_dense


@dataclass
class QuantizedWeight:
    """One quantized weight W [N, K].

    ``segments``: dense codes and decoders, columns in storage order (``perm`` applied).
    ``perm``: storage column ``j`` is original column ``perm[j]`` (None: identity).
    ``keep_mask``: bool [N, K] in original column order, the weights kept in 16 bits.
    ``kept_values``: fp32 [N, K] (only read where ``keep_mask``): the values to reproduce there.
    """

    segments: list[SegmentData]
    perm: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    kept_values: torch.Tensor | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return 0 if self.keep_mask is None else int(self.keep_mask.sum())

    def pack(self, name: str = "", bias: torch.Tensor | None = None) -> PackedLayer:
        """The format-v1 layer: dense codes + CSR correction at exactly the kept positions."""
        segments = [dataclasses.replace(s, codes=s.codes.cpu(),
                                        scale=None if s.scale is None else s.scale.cpu(),
                                        zero=None if s.zero is None else s.zero.cpu(),
                                        lut=None if s.lut is None else s.lut.cpu()) for s in self.segments]
        perm = None if self.perm is None else self.perm.cpu()
        if self.n_kept:
            segments = _zero_code_at_kept(segments, self.keep_mask.cpu(), perm)
        layer = build_layer(segments, perm=perm, bias=None if bias is None else bias.cpu(), name=name)
        if not self.n_kept:
            return layer
        dense = dequantize_dense(layer)  # fp32, original column order: what the reader decodes
        rows, cols = torch.nonzero(self.keep_mask.cpu(), as_tuple=True)  # row-major, as CSR needs
        vals = (self.kept_values.cpu().to(torch.float32)[rows, cols] - dense[rows, cols]).to(torch.float16)
        n = layer.spec.out_features
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        tensors = dict(layer.tensors)
        tensors["sparse_row_ptr"] = row_ptr.to(torch.int32)
        tensors["sparse_col"] = cols.to(COL_DTYPES[layer.spec.col_dtype])
        tensors["sparse_val"] = vals
        spec: LayerSpec = dataclasses.replace(layer.spec, nnz=int(vals.numel()))
        return PackedLayer(spec, tensors, name)

    def effective_weight(self, packed: PackedLayer | None = None) -> torch.Tensor:
        """fp32 [N, K]: exactly what a reader of the packed layer computes (dense decode + S)."""
        return dequantize(packed if packed is not None else self.pack())


def _zero_code_at_kept(segments: list[SegmentData], keep: torch.Tensor, perm: torch.Tensor | None) -> list[SegmentData]:
    """Affine segments with the code at every kept position set to the zero point (decodes to 0)."""
    keep_storage = keep if perm is None else keep[:, perm.long()]
    out, start = [], 0
    for seg in segments:
        k = seg.codes.shape[1]
        ks = keep_storage[:, start:start + k]
        if seg.decoder == "affine" and bool(ks.any()):
            g = seg.group_size or k
            zero_codes = seg.zero.to(torch.float32)[torch.arange(k) // g].t()  # [N, k]
            codes = torch.where(ks, zero_codes.round().to(seg.codes.dtype), seg.codes)
            seg = dataclasses.replace(seg, codes=codes)
        out.append(seg)
        start += k
    return out
