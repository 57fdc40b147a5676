"""Bit-plane packing of 2/3/4-bit codes along K (format v1, see docs/format.md).

A code matrix belongs to one column segment of a weight W [N, K_seg] (N output rows, K_seg input
columns). On disk and in memory the codes are stored K-major with N fastest, as *bit-planes*:

* a w-bit plane (w in {1, 2, 4}) is an int32 tensor [K_pad * w / 32, N];
* word ``r`` of column ``n`` holds the codes of rows ``k = r * (32 // w) + i`` (i = 0 .. 32/w - 1)
  in bits ``[i * w, (i + 1) * w)`` (little-endian within the word);
* K is padded with zero codes to ``K_pad``, the next multiple of 32, so that every plane of a
  segment has a whole number of words per column and a 32-row slice of K always maps to the same
  word row of every plane;
* 2-bit codes are one 2-bit plane (``q2``); 3-bit codes are a 2-bit plane with the low two bits
  plus a 1-bit plane with the high bit (``q2`` + ``q1``, code = q2 | q1 << 2); 4-bit codes are one
  4-bit plane (``q4``).

The planes are signed int32 because that is what safetensors and Triton handle everywhere; the
bit pattern is what matters (bit 31 may be set).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)
K_ALIGN = 32

# bits -> ((plane name, plane width, shift of the plane inside the code), ...)
PLANES: dict[int, tuple[tuple[str, int, int], ...]] = {
    2: (("q2", 2, 0),),
    3: (("q2", 2, 0), ("q1", 1, 2)),
    4: (("q4", 4, 0),),
}


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 32-row words."""
    return -(-k // K_ALIGN) * K_ALIGN


def plane_rows(k: int, width: int) -> int:
    """Number of int32 rows of a ``width``-bit plane holding ``k`` codes per column."""
    return padded_k(k) * width // 32


def plane_layout(bits: int) -> tuple[tuple[str, int, int], ...]:
    """The planes (name, width, shift) that store ``bits``-bit codes."""
    if bits not in PLANES:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return PLANES[bits]


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_plane(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``values`` [K, N] (integers in [0, 2^width)) into an int32 plane [K_pad*width/32, N]."""
    if width not in (1, 2, 4):
        raise ValueError(f"plane width must be 1, 2 or 4, got {width}")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [K, N], got shape {tuple(values.shape)}")
    k, n = values.shape
    per_word = 32 // width
    v = torch.zeros(padded_k(k), n, dtype=torch.int64, device=values.device)
    v[:k] = values.to(torch.int64)
    v = v.view(-1, per_word, n)
    shifts = (torch.arange(per_word, device=values.device, dtype=torch.int64) * width).view(1, -1, 1)
    return _to_int32_bits((v << shifts).sum(dim=1))


def unpack_plane(plane: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_plane`: int32 [K_pad*width/32, N] -> int64 [k, N]."""
    per_word = 32 // width
    words = plane.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, device=plane.device, dtype=torch.int64) * width).view(1, -1, 1)
    values = (words.unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return values.reshape(-1, plane.shape[-1])[:k]


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Pack codes [N, K] (weight orientation, integers in [0, 2^bits)) into named bit-planes.

    Returns ``{"q2": int32 [K_pad/16, N]}`` for 2 bits, ``{"q2": ..., "q1": int32 [K_pad/32, N]}``
    for 3 bits and ``{"q4": int32 [K_pad/8, N]}`` for 4 bits.
    """
    layout = plane_layout(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(
            f"{bits}-bit codes must lie in [0, {2**bits - 1}], got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    t = codes.t().to(torch.int64)
    return {name: pack_plane((t >> shift) & ((1 << width) - 1), width) for name, width, shift in layout}


def unpack_codes(planes: dict[str, torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: named planes -> int64 codes [N, k]."""
    out = None
    for name, width, shift in plane_layout(bits):
        part = unpack_plane(planes[name], width, k) << shift
        out = part if out is None else out | part
    return out.t()
