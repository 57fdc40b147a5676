"""Round-to-nearest: the simplest baseline. Each group of ``group_size`` input columns of each
output row gets its own asymmetric b-bit grid (the same fit as GPTQ, clipping search included),
and every weight is rounded to the nearest grid point; no data is used and no error is propagated.
"""

from __future__ import annotations

import torch

from tacq_kernels import SegmentData

from .affine import fit_affine, quantize_codes
from .quantized_weight import QuantizedWeight


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = -1, clip_search: bool = True) -> QuantizedWeight:
    """Quantize ``weight`` [N, K]; ``group_size = -1`` (or >= K) means one group per row."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    g = k if group_size is None or group_size <= 0 or group_size >= k else group_size
    n_groups = -(-k // g)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n_groups, n, dtype=torch.float32, device=w.device)
    zero = torch.empty(n_groups, n, dtype=torch.float32, device=w.device)
    for gi in range(n_groups):
        cols = slice(gi * g, min((gi + 1) * g, k))
        s, z = fit_affine(w[:, cols], bits, clip_search=clip_search)
        scale[gi], zero[gi] = s, z
        codes[:, cols] = quantize_codes(w[:, cols], s[:, None], z[:, None], bits).to(torch.uint8)
    return QuantizedWeight([SegmentData(bits=bits, codes=codes, decoder="affine", scale=scale, zero=zero, group_size=g)])
