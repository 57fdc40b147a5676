"""Random format-v1 layers for tests and benchmarks (kernel speed does not depend on values)."""

from __future__ import annotations

from typing import Sequence

import torch

from .format import PackedLayer, SegmentData, build_layer


def random_layer(
    out_features: int,
    in_features: int,
    bits: int | Sequence[int] = 3,
    decoder: str | Sequence[str] = "affine",
    group_size: int | None = None,
    outlier_frac: float = 0.0,
    perm: bool = False,
    bias: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    name: str = "random",
    generate_on_device: bool = False,
) -> PackedLayer:
    """A layer with random codes, realistic scales/zeros/codebooks and random sparse outliers.

    ``bits`` (and ``decoder``) may be sequences to make several segments that split K as evenly
    as possible, as CLAQ's adaptive precision does. Values are drawn so that the dequantized
    weight has a standard deviation of about 0.02, like a trained LLM's linear layers.

    By default values are drawn on the CPU (the same layer for a seed on every machine) and moved
    to ``device``. ``generate_on_device=True`` draws and packs them on ``device`` instead: other
    values for the same seed, but a 28672 x 8192 layer takes milliseconds on a GPU instead of tens
    of seconds on the CPU (what the benchmarks use; kernel speed does not depend on the values).
    """
    gen = torch.device(device) if generate_on_device else torch.device("cpu")
    g = torch.Generator(device=gen).manual_seed(seed)
    bits_list = [bits] if isinstance(bits, int) else list(bits)
    dec_list = [decoder] * len(bits_list) if isinstance(decoder, str) else list(decoder)
    if len(dec_list) != len(bits_list):
        raise ValueError("bits and decoder must have the same number of segments")
    n, k = out_features, in_features
    bounds = [round(i * k / len(bits_list)) for i in range(len(bits_list) + 1)]
    segments = []
    for b, dec, lo, hi in zip(bits_list, dec_list, bounds[:-1], bounds[1:]):
        kk = hi - lo
        if kk <= 0:
            raise ValueError(f"in_features={k} is too small for {len(bits_list)} segments")
        levels = 2**b
        codes = torch.randint(0, levels, (n, kk), generator=g, device=gen)
        if dec == "affine":
            gs = group_size or kk
            ng = -(-kk // gs)
            scale = (0.04 / levels) * (0.5 + torch.rand(ng, n, generator=g, device=gen))
            zero = torch.round((levels - 1) / 2 + torch.randn(ng, n, generator=g, device=gen).clamp(-1, 1))
            segments.append(SegmentData(b, codes, "affine", scale=scale, zero=zero, group_size=gs))
        else:
            lut = torch.sort(torch.randn(kk, levels, generator=g, device=gen) * 0.02, dim=1).values
            segments.append(SegmentData(b, codes, "lut", lut=lut))
    p = torch.randperm(k, generator=g, device=gen) if perm else None
    sparse = None
    if outlier_frac > 0:
        nnz = max(1, round(outlier_frac * n * k))
        flat = torch.randperm(n * k, generator=g, device=gen)[:nnz]
        sparse = torch.zeros(n * k, device=gen)
        sparse[flat] = torch.randn(nnz, generator=g, device=gen) * 0.1
        sparse = sparse.view(n, k)
    b = torch.randn(n, generator=g, device=gen) * 0.01 if bias else None
    return build_layer(segments, perm=p, sparse=sparse, bias=b, name=name).to(device)
