"""Large-batch path (prefill, M > 1024): dequantize to x's dtype, fold the CSR in, cuBLAS GEMM.

At large M the multiply is compute-bound: 2*M*N*K flops against N*K*(bits/8) bytes of codes. A
dense weight of x's dtype costs one extra write and read of 2 bytes per weight, which on an H100
(~3.35 TB/s, ~660 dense fp16 TFLOP/s achievable) is about 400/M of the GEMM's time: 20 % at
M = 2048 and falling. In exchange the multiply runs in cuBLAS, which a Triton GEMM without
warp specialisation does not match on Hopper. So:

1. ``dequant_kernel`` (one launch per segment) decodes a [BLOCK_K, BLOCK_N] tile of codes and
   writes it to Wt [K, N] (x's dtype, K-major like the planes) at the tile's ORIGINAL K rows, so a
   permutation costs nothing: whole N-contiguous rows are written to permuted row indices.
2. ``csr_fold_kernel`` adds the sparse correction into Wt in place: program ``pid`` owns output
   columns [pid * BLOCK_N, +BLOCK_N) of Wt (W's rows) and walks their CSR entries, so no two
   programs touch one element and duplicate entries of a row are added one after the other. The
   sparse part then rides on the tensor cores with the dense part; a separate SpMM would re-read x
   for every nonzero, M times.
3. ``torch.addmm(bias, x, Wt)`` (cuBLAS).

Wt is a temporary of K * N elements (117 MB for a 4096 x 14336 layer in fp16); it is freed back
to PyTorch's caching allocator after the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import PackedLayer
from .common import check_call, decode_affine_per_row, decode_lut, load_codes, segment_args

DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 128, 64
FOLD_BLOCK_N = 128


@triton.jit
def dequant_kernel(
    perm_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr, wt_ptr,
    N, K_SEG, SEG_START, GROUP_SIZE,
    BITS: tl.constexpr, IS_LUT: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode one segment into Wt.

    perm int32 [K] (HAS_PERM); q2/q1/q4, scale/zero, lut: the segment's tensors as in
    ``gemv.gemv_kernel``; wt [K, N] contiguous (fp16/bf16/fp32), ORIGINAL K order: row
    perm[SEG_START + j] receives the segment's local row j. Grid: (cdiv(N, BLOCK_N), cdiv(K_SEG, BLOCK_K)).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    chunk_start = pid_k * BLOCK_K
    mask_k = chunk_start + kk < K_SEG
    q = load_codes(q2_ptr, q1_ptr, q4_ptr, chunk_start, K_SEG, offs_n, mask_n, N, BITS, BLOCK_K, BLOCK_N)
    if IS_LUT:
        w = decode_lut(q, lut_ptr, chunk_start + kk, mask_k, 1.0, BITS)
    else:
        w = decode_affine_per_row(q, scale_ptr, zero_ptr, chunk_start + kk, mask_k, offs_n, mask_n, N, GROUP_SIZE)
    rows = SEG_START + chunk_start + kk
    if HAS_PERM:
        rows = tl.load(perm_ptr + rows, mask=mask_k, other=0)
    ptrs = wt_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, w.to(wt_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def csr_fold_kernel(row_ptr_ptr, col_ptr, val_ptr, wt_ptr, N, BLOCK_N: tl.constexpr):
    """Wt[col, n] += val for every CSR entry (n, col, val) of output columns [pid * BLOCK_N, +BLOCK_N).

    row_ptr int32 [N+1], col int16/int32 [nnz], val fp16 [nnz]; wt [K, N] contiguous. The sum is
    formed in fp32 and rounded once to Wt's dtype.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
    end = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0)
    longest = tl.max(end - start, axis=0)
    for i in range(0, longest):
        entry = start + i
        live = entry < end
        col = tl.load(col_ptr + entry, mask=live, other=0).to(tl.int64)
        val = tl.load(val_ptr + entry, mask=live, other=0.0).to(tl.float32)
        ptrs = wt_ptr + col * N + offs_n
        w = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
        tl.store(ptrs, (w + val).to(wt_ptr.dtype.element_ty), mask=live)


def dequantize_t(layer: PackedLayer, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The effective weight D + S, transposed: Wt [K, N] in ``dtype``, original column order.

    With ``dtype=torch.float32`` it equals :func:`tacq_kernels.reference.dequantize` ``.t()``.
    """
    spec = layer.spec
    t = layer.tensors
    k, n = spec.in_features, spec.out_features
    anchor = t["sparse_row_ptr"]
    wt = torch.empty((k, n), dtype=dtype, device=device or anchor.device)
    perm = t.get("perm", anchor)
    for i, seg in enumerate(spec.segments):
        q2, q1, q4, scale, zero, lut = segment_args(layer, i)
        grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(seg.k, DEQUANT_BLOCK_K))
        dequant_kernel[grid](
            perm, q2, q1, q4, scale, zero, lut, wt,
            n, seg.k, seg.start, seg.group_size or 1,
            BITS=seg.bits, IS_LUT=seg.decoder == "lut", HAS_PERM=spec.has_perm,
            BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K, num_warps=4,
        )
    if spec.nnz:
        csr_fold_kernel[(triton.cdiv(n, FOLD_BLOCK_N),)](
            t["sparse_row_ptr"], t["sparse_col"], t["sparse_val"], wt, n, BLOCK_N=FOLD_BLOCK_N, num_warps=4
        )
    return wt


def dequantize(layer: PackedLayer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The effective weight D + S as [N, K] in ``dtype`` (a transposed view of :func:`dequantize_t`)."""
    return dequantize_t(layer, dtype).t()


def prefill(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (dequant(D) + S)^T + bias as dequantize + fold + ``torch.addmm``, any M. Returns ``out``."""
    out = check_call(x, layer, out, "prefill")
    if x.shape[0] == 0:
        return out
    wt = dequantize_t(layer, x.dtype, x.device)
    bias = layer.bias
    if bias is None:
        torch.matmul(x, wt, out=out)
    else:
        torch.addmm(bias.to(x.dtype), x, wt, out=out)
    return out
