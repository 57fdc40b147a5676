"""Small-batch path (decode, M = 1..8): split-K GEMV on CUDA cores, CSR outliers fused.

Work split: program (pid_n, pid_k) owns output columns [pid_n * BLOCK_N, +BLOCK_N) and the
pid_k-th of SPLIT_K contiguous runs of BLOCK_K-row chunks of one segment's K. It streams the
bit-plane words of its chunks once, decodes them in registers (see ``_gemv_tile``), multiplies
by the (few) rows of x, and walks every SPLIT_K-th CSR entry of its output columns, so the sparse
work is spread over the split-K programs of the tile and needs no second launch. Split ``s``
writes (or, after an earlier segment, adds to) slice ``s`` of an fp32 workspace [max SPLIT_K,
M, N] that one reduction launch sums, adds the bias to and casts; when every split count is 1
the last segment's kernel writes the output itself (``common.write_tile``).

Affine segments apply scale and zero once per group, not per weight:
y = s * (sum_k q x) - s * z * (sum_k x). With one group per row (TACQ's default) that happens
once per program, after the K loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import PackedLayer, SegmentSpec
from . import tuning
from .common import (
    GROUP_PER_CHUNK,
    ONE_GROUP,
    check_call,
    csr_tile,
    decode_affine_per_row,
    decode_lut,
    group_mode,
    load_words,
    run_segments,
    segment_configs,
    segment_args,
    write_tile,
)

MAX_M = 8  # larger M belongs to the tensor-core path (gemm)

# (BLOCK_N, BLOCK_K, num_warps) per BLOCK_M, default first. Chosen with compile checks for sm_80
# and sm_90 (python -m tacq_kernels.kernels.compile_check): no register spills for any bit-width
# or decoder, 40-130 registers per thread.
TILES = {
    # Wide N tiles give each thread more columns per x value it loads (x is broadcast along N).
    # (1024, 32, 8) was dropped: ptxas spilled 40 B of it for 2-bit g128 on sm_90.
    1: [(256, 64, 4), (128, 64, 4), (128, 128, 4), (256, 128, 8), (512, 64, 8), (512, 64, 4)],
    2: [(128, 64, 4), (128, 32, 4), (64, 64, 4), (256, 32, 8), (64, 32, 4)],
    4: [(128, 32, 4), (128, 64, 4), (64, 64, 4), (256, 32, 8), (64, 32, 4)],
    8: [(64, 32, 4), (128, 32, 4), (64, 64, 4), (256, 32, 8)],
}


def t_unroll(block_m: int, bits: int, decoder: str) -> int:
    """How far the loop over the bit positions of a word is unrolled (T_UNROLL).

    Fully unrolled, every shift is a constant; but ptxas then hoists the x and table loads of
    all steps, which for M > 1 or a 3/4-bit table (8-16 entries per K row) costs more registers
    than there are (compile checks: 250+ and spills), so those unroll by 2.
    """
    full = 8 if bits == 4 else 16
    return full if block_m == 1 and (decoder == "affine" or bits == 2) else 2


def candidates(m: int, n: int, seg: SegmentSpec, sms: int) -> list[dict]:
    """Configs worth timing for one segment: each tile for this BLOCK_M with the split-K count
    that gives about two programs per SM, then half and double that."""
    block_m = tuning.next_pow2(m)
    out = []
    for block_n, block_k, warps in TILES[block_m]:
        tiles = triton.cdiv(n, block_n)
        chunks = triton.cdiv(seg.k, block_k)
        fill = max(1, min(chunks, triton.cdiv(2 * sms, tiles)))
        for split in dict.fromkeys((fill, max(1, fill // 2), min(chunks, 2 * fill))):
            out.append(dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, num_stages=2,
                            T_UNROLL=t_unroll(block_m, seg.bits, seg.decoder)))
    return out


@triton.jit
def _codes_at(lo, hi, t, BITS: tl.constexpr):
    """Codes of K rows r*VPW + t (int32 [R, BLOCK_N]); with the t loop unrolled, constant shifts."""
    if BITS == 4:
        q = (lo >> (4 * t)) & 15
    else:
        q = (lo >> (2 * t)) & 3
        if BITS == 3:
            q = q | (((hi >> t) & 1) << 2)
    return q


@triton.jit
def _gemv_tile(
    x_ptr, perm_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr, M, N, K_SEG, SEG_START, GROUP_SIZE,
    stride_xm, chunk_begin, chunk_end, offs_m, mask_m, offs_n, mask_n,
    BITS: tl.constexpr, IS_LUT: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, T_UNROLL: tl.constexpr,
):
    """y[m, n] (fp32 [BLOCK_M, BLOCK_N]) over chunks [chunk_begin, chunk_end) of one segment.

    Per chunk the plane words are loaded once, compactly ([R, BLOCK_N] int32, R = BLOCK_K/VPW,
    VPW = codes per word of the 2- or 4-bit plane); a loop over the VPW bit positions t then
    decodes K rows r*VPW + t of every word and multiplies them by the matching x values. Fully
    unrolled (T_UNROLL = VPW) its shifts are constants. Products accumulate element-wise in an
    [R, BLOCK_N] tile ([BLOCK_M, R, BLOCK_N] for M > 1) that is reduced over R once, after the K
    loop, so the loop body has no cross-thread traffic. Per weight: shift + mask + convert + one
    FMA for affine with one group per row (s and z applied at the end as s * (sum q x - z * sum x));
    one more FMA for groups that are multiples of BLOCK_K (w = q*s - z*s, s and z*s per chunk);
    the select tree for a LUT (with M = 1, x is folded into the table, so no multiply remains).
    """
    VPW: tl.constexpr = 8 if BITS == 4 else 16
    R: tl.constexpr = BLOCK_K // VPW
    rr = tl.arange(0, R)
    # M = 1 keeps everything 2-D ([R, BLOCK_N]); a 3-D product would make Triton convert the
    # decoded tile between layouts at every step.
    if BLOCK_M == 1:
        acc_t = tl.zeros((R, BLOCK_N), tl.float32)
        sum_x = tl.zeros((R,), tl.float32)  # ONE_GROUP: sums of x, reduced after the loop
    else:
        acc_t = tl.zeros((BLOCK_M, R, BLOCK_N), tl.float32)
        sum_x = tl.zeros((BLOCK_M, R), tl.float32)
    for chunk in range(chunk_begin, chunk_end):
        chunk_start = chunk * BLOCK_K
        lo, hi = load_words(q2_ptr, q1_ptr, q4_ptr, chunk_start, rr, chunk_start + rr * VPW < K_SEG, offs_n,
                             mask_n, N, BITS)
        if GROUP_MODE == GROUP_PER_CHUNK:
            g = chunk_start // GROUP_SIZE
            s = tl.load(scale_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zs = tl.load(zero_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) * s
        for t in tl.range(0, VPW, loop_unroll_factor=T_UNROLL):
            rows = chunk_start + rr * VPW + t  # segment-local K rows decoded in this step
            mask_rows = rows < K_SEG
            cols = SEG_START + rows
            if HAS_PERM:
                cols = tl.load(perm_ptr + cols, mask=mask_rows, other=0)
            q = _codes_at(lo, hi, t, BITS)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + cols, mask=mask_rows, other=0.0).to(tl.float32)  # [R]
                if IS_LUT:
                    acc_t += decode_lut(q, lut_ptr, rows, mask_rows, x, BITS)
                elif GROUP_MODE == ONE_GROUP:
                    acc_t += x[:, None] * q.to(tl.float32)
                    sum_x += x
                elif GROUP_MODE == GROUP_PER_CHUNK:
                    acc_t += x[:, None] * (q.to(tl.float32) * s[None, :] - zs[None, :])
                else:
                    acc_t += x[:, None] * decode_affine_per_row(
                        q, scale_ptr, zero_ptr, rows, mask_rows, offs_n, mask_n, N, GROUP_SIZE
                    )
            else:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                            mask=mask_m[:, None] & mask_rows[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, R]
                if IS_LUT:
                    w = decode_lut(q, lut_ptr, rows, mask_rows, 1.0, BITS)
                elif GROUP_MODE == ONE_GROUP:
                    w = q.to(tl.float32)
                    sum_x += x
                elif GROUP_MODE == GROUP_PER_CHUNK:
                    w = q.to(tl.float32) * s[None, :] - zs[None, :]
                else:
                    w = decode_affine_per_row(q, scale_ptr, zero_ptr, rows, mask_rows, offs_n, mask_n, N, GROUP_SIZE)
                acc_t += x[:, :, None] * w[None, :, :]
    if BLOCK_M == 1:
        acc = tl.sum(acc_t, axis=0)[None, :]
        total_x = tl.sum(sum_x, axis=0)
    else:
        acc = tl.sum(acc_t, axis=1)
        total_x = tl.sum(sum_x, axis=1)[:, None]
    if not IS_LUT:
        if GROUP_MODE == ONE_GROUP:
            s1 = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z1 = tl.load(zero_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = s1[None, :] * (acc - z1[None, :] * total_x)
    return acc


@triton.jit
def gemv_kernel(
    x_ptr, perm_ptr,
    q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr,
    row_ptr_ptr, col_ptr, val_ptr, bias_ptr,
    out_ptr, part_ptr,
    M, N, K_SEG, SEG_START, GROUP_SIZE, stride_xm, prev_slices,
    BITS: tl.constexpr, IS_LUT: tl.constexpr, GROUP_MODE: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    T_UNROLL: tl.constexpr,
):
    """One segment's contribution to y [M, N] = x [M, K] @ W^T (plus, if HAS_SPARSE, the CSR part).

    x        fp16/bf16/fp32 [M, K], row stride ``stride_xm``, unit stride in K, ORIGINAL column order
    perm     int32 [K] (HAS_PERM): permuted column j is original column perm[j]
    q2       int32 [K_pad/16, N] (2/3-bit), q1 int32 [K_pad/32, N] (3-bit), q4 int32 [K_pad/8, N]
             (4-bit): the segment's bit-planes, N fastest; K_pad = K_SEG rounded up to 32
    scale, zero  fp16 [ceil(K_SEG/GROUP_SIZE), N] (affine), lut fp16 [K_SEG, 2^BITS] (IS_LUT)
    row_ptr  int32 [N+1], col int16/int32 [nnz], val fp16 [nnz]: the CSR correction (HAS_SPARSE)
    bias     fp16 [N] (HAS_BIAS, used only when DIRECT)
    out      [M, N] contiguous, x's dtype (DIRECT); part fp32 [P, M, N], this program's slice is
             pid_k (added to if pid_k < prev_slices; see common.write_tile)
    The segment covers permuted columns [SEG_START, SEG_START + K_SEG).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    n_chunks = tl.cdiv(K_SEG, BLOCK_K)
    per_split = tl.cdiv(n_chunks, SPLIT_K)
    chunk_begin = pid_k * per_split
    chunk_end = tl.minimum(chunk_begin + per_split, n_chunks)

    acc = _gemv_tile(
        x_ptr, perm_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr, M, N, K_SEG, SEG_START, GROUP_SIZE,
        stride_xm, chunk_begin, chunk_end, offs_m, mask_m, offs_n, mask_n, BITS, IS_LUT, GROUP_MODE, HAS_PERM,
        BLOCK_M, BLOCK_N, BLOCK_K, T_UNROLL,
    )

    if HAS_SPARSE:
        acc = csr_tile(acc, x_ptr, stride_xm, offs_m, mask_m, row_ptr_ptr, col_ptr, val_ptr, offs_n, mask_n, pid_k,
                       SPLIT_K)
    write_tile(acc, out_ptr, part_ptr, bias_ptr, offs_m, mask_m, offs_n, mask_n, M, N, pid_k, prev_slices,
               HAS_BIAS, DIRECT)


def _launch_segment(x, layer, i, cfg, out, part, prev_slices, direct):
    spec = layer.spec
    seg = spec.segments[i]
    t = layer.tensors
    q2, q1, q4, scale, zero, lut = segment_args(layer, i)
    m, n = x.shape[0], spec.out_features
    has_sparse = i == 0 and spec.nnz > 0
    bias = layer.bias
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    gemv_kernel[grid](
        x, t.get("perm", x),
        q2, q1, q4, scale, zero, lut,
        t["sparse_row_ptr"], t["sparse_col"], t["sparse_val"], bias if bias is not None else x,
        out, part,
        m, n, seg.k, seg.start, seg.group_size or 1, x.stride(0), prev_slices,
        BITS=seg.bits, IS_LUT=seg.decoder == "lut",
        GROUP_MODE=group_mode(seg, cfg["BLOCK_K"]),
        HAS_PERM=spec.has_perm, HAS_SPARSE=has_sparse, HAS_BIAS=bias is not None, DIRECT=direct,
        BLOCK_M=tuning.next_pow2(m), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        T_UNROLL=cfg.get("T_UNROLL") or t_unroll(tuning.next_pow2(m), seg.bits, seg.decoder),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def gemv(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor | None = None, *, config: dict | None = None):
    """y = x @ (dequant(D) + S)^T + bias with the split-K GEMV, for x [M <= 8, K].

    ``config`` (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages and optionally T_UNROLL) forces
    one config for every segment, skipping tuning; tests use it to cover split-K and tile edges.
    Returns ``out``.
    """
    out = check_call(x, layer, out, "gemv")
    m, n = x.shape[0], layer.spec.out_features
    if m > MAX_M:
        raise ValueError(f"gemv: M={m} > {MAX_M}; use gemm")
    if m == 0:
        return out

    def launch(i, cfg, out, part, prev, direct):
        _launch_segment(x, layer, i, cfg, out, part, prev, direct)

    if config is not None:
        configs = [config] * len(layer.spec.segments)
    else:
        sms = tuning.num_sms(x.device)
        m_bucket = tuning.next_pow2(m)  # BLOCK_M; M = 3 runs the kernel tuned for M = 4
        configs = segment_configs(
            "gemv", x, m_bucket, layer, lambda seg: candidates(m, n, seg, sms), launch
        )
    return run_segments(layer, configs, out, launch)
