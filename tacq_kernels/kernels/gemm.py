"""Medium-batch path (M = 9..1024): dequantize in registers + tensor-core ``tl.dot``, CSR fused.

Program (pid_n, pid_m, pid_k) owns the output tile [BLOCK_M, BLOCK_N] and the pid_k-th of SPLIT_K
runs of BLOCK_K-row chunks of one segment's K. Per chunk it loads an x tile and the bit-plane
words of a [BLOCK_K, BLOCK_N] weight tile, decodes them in registers and feeds ``tl.dot``:

* affine, one group per row or groups that are a multiple of BLOCK_K: the *codes* go into the dot
  (0..15 are exact in fp16 and bf16), and scale and zero are applied to the fp32 result once per
  group: acc += s * (dot(x, q) - z * sum_k x). No weight is ever rounded.
* affine with other group sizes: w = (q - z) * s per element, rounded to x's dtype, then the dot.
* LUT: the select tree of ``common.decode_lut`` gives w (the fp16 table entries are exact in fp16;
  bf16 activations round them to bf16), then the dot.

The CSR correction is added by the same programs (``common.csr_tile``), each split taking every
SPLIT_K-th entry of its rows. Splits and segments accumulate into the fp32 workspace as in the
GEMV (``common.write_tile``). With a permutation the launcher gathers x's columns once
(``x[:, perm]``, M x K elements) so that the kernel's x loads stay contiguous; the CSR part reads
the original x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import PackedLayer, SegmentSpec
from . import tuning
from .common import (
    GROUP_PER_ROW,
    ONE_GROUP,
    check_call,
    csr_tile,
    decode_affine_per_row,
    decode_lut,
    dot_in_fp32,
    group_mode,
    load_codes,
    run_segments,
    segment_configs,
    segment_args,
    write_tile,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). candidates() keeps the tiles whose BLOCK_M
# suits M and adds the split-K count that fills the GPU; the first kept one is the default.
# Chosen with compile checks for sm_80 and sm_90 (python -m tacq_kernels.kernels.compile_check):
# no spills, and the software pipeline's shared memory well under 100 KB.
TILES = [
    (16, 128, 64, 4, 3), (16, 256, 64, 8, 3), (16, 64, 64, 4, 3),
    (32, 128, 64, 4, 3), (32, 256, 64, 8, 3), (32, 64, 64, 4, 3),
    (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (64, 256, 32, 8, 3),
    (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
]
# 3- and 4-bit tables hold 8-16 entries per K row, all live during the select tree: BLOCK_K 32
# keeps them in registers.
TILES_WIDE_LUT = [
    (16, 128, 32, 4, 3), (16, 64, 32, 4, 3),
    (32, 128, 32, 4, 3), (32, 64, 32, 4, 3),
    (64, 128, 32, 4, 4), (64, 64, 32, 4, 3), (64, 256, 32, 8, 3),
    (128, 64, 32, 4, 3),  # (128, 128, 32, 8, 3) spills 264 B for 4-bit tables on sm_90
]
MAX_WORKSPACE_BYTES = 64 << 20  # split-K slices beyond this cost more traffic than they save


def candidates(m: int, n: int, seg: SegmentSpec, sms: int) -> list[dict]:
    """Configs worth timing for one segment of an [M, N] output, default first."""
    block_m_max = min(128, max(16, tuning.next_pow2(m)))
    block_m_min = max(16, block_m_max // 4)
    tiles = TILES_WIDE_LUT if seg.decoder == "lut" and seg.bits >= 3 else TILES
    # Largest BLOCK_M first: the default then reads each weight tile for as many rows as it can.
    tiles = sorted((t for t in tiles if block_m_min <= t[0] <= block_m_max), key=lambda t: -t[0])
    if seg.decoder == "affine" and seg.group_size < seg.k:
        # Prefer BLOCK_K dividing the group (scale/zero once per chunk, not per K row). Otherwise
        # scale and zero are gathered per element and staged through shared memory like the
        # codes: tiles over 8192 elements then need 170-185 KB, more than an A100 has.
        dividing = [t for t in tiles if seg.group_size % t[2] == 0]
        tiles = dividing or [t for t in tiles if t[1] * t[2] <= 8192]
    out = []
    for block_m, block_n, block_k, warps, stages in tiles:
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        chunks = triton.cdiv(seg.k, block_k)
        fill = max(1, min(chunks, triton.cdiv(2 * sms, programs), MAX_WORKSPACE_BYTES // (4 * m * n)))
        for split in dict.fromkeys((fill, max(1, fill // 2))):
            out.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                            num_warps=warps, num_stages=stages))
    return out


@triton.jit
def gemm_kernel(
    x_ptr, x_orig_ptr,
    q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr,
    row_ptr_ptr, col_ptr, val_ptr, bias_ptr,
    out_ptr, part_ptr,
    M, N, K_SEG, SEG_START, GROUP_SIZE, stride_xm, stride_xom, prev_slices,
    BITS: tl.constexpr, IS_LUT: tl.constexpr, GROUP_MODE: tl.constexpr,
    HAS_SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One segment's contribution to y [M, N] = x @ W^T (plus, if HAS_SPARSE, the CSR part).

    x        fp16/bf16/fp32 [M, K], row stride ``stride_xm``, unit stride in K, PERMUTED column
             order (the dense part's); x_orig: the same values in the original order (for the CSR)
    q2/q1/q4, scale/zero, lut, row_ptr/col/val, bias, out, part: as in ``gemv.gemv_kernel``
    DOT_FP32 feeds tl.dot fp32 operands at IEEE precision (fp32 x, or bf16 under the interpreter)
    The segment covers permuted columns [SEG_START, SEG_START + K_SEG).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kk = tl.arange(0, BLOCK_K)

    n_chunks = tl.cdiv(K_SEG, BLOCK_K)
    per_split = tl.cdiv(n_chunks, SPLIT_K)
    chunk_begin = pid_k * per_split
    chunk_end = tl.minimum(chunk_begin + per_split, n_chunks)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    sum_qx = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # ONE_GROUP: dot(x, q) over the whole run
    sum_x = tl.zeros((BLOCK_M,), tl.float32)  # ONE_GROUP: sum_k x over the whole run
    x_rows = x_ptr + offs_m[:, None] * stride_xm + SEG_START
    for chunk in range(chunk_begin, chunk_end):
        chunk_start = chunk * BLOCK_K
        mask_k = chunk_start + kk < K_SEG
        xt = tl.load(x_rows + (chunk_start + kk)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
        q = load_codes(q2_ptr, q1_ptr, q4_ptr, chunk_start, K_SEG, offs_n, mask_n, N, BITS, BLOCK_K, BLOCK_N)
        if IS_LUT or GROUP_MODE == GROUP_PER_ROW:
            if IS_LUT:
                w = decode_lut(q, lut_ptr, chunk_start + kk, mask_k, 1.0, BITS)
            else:
                w = decode_affine_per_row(
                    q, scale_ptr, zero_ptr, chunk_start + kk, mask_k, offs_n, mask_n, N, GROUP_SIZE
                )
            if DOT_FP32:
                acc = tl.dot(xt, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w.to(xt.dtype), acc)
        else:
            if DOT_FP32:
                qx = tl.dot(xt, q.to(tl.float32), input_precision="ieee")
            else:
                qx = tl.dot(xt, q.to(xt.dtype))
            if GROUP_MODE == ONE_GROUP:
                sum_qx += qx
                sum_x += tl.sum(xt.to(tl.float32), axis=1)
            else:  # GROUP_PER_CHUNK: this chunk lies inside one group
                g = chunk_start // GROUP_SIZE
                s = tl.load(scale_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc += s[None, :] * (qx - z[None, :] * tl.sum(xt.to(tl.float32), axis=1)[:, None])
    if not IS_LUT:
        if GROUP_MODE == ONE_GROUP:
            s = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += s[None, :] * (sum_qx - z[None, :] * sum_x[:, None])

    if HAS_SPARSE:
        acc = csr_tile(acc, x_orig_ptr, stride_xom, offs_m, mask_m, row_ptr_ptr, col_ptr, val_ptr, offs_n, mask_n,
                       pid_k, SPLIT_K)
    write_tile(acc, out_ptr, part_ptr, bias_ptr, offs_m, mask_m, offs_n, mask_n, M, N, pid_k, prev_slices,
               HAS_BIAS, DIRECT)


def _launch_segment(x_dense, x, layer, i, cfg, out, part, prev_slices, direct):
    spec = layer.spec
    seg = spec.segments[i]
    t = layer.tensors
    q2, q1, q4, scale, zero, lut = segment_args(layer, i)
    m, n = x.shape[0], spec.out_features
    bias = layer.bias
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), cfg["SPLIT_K"])
    gemm_kernel[grid](
        x_dense, x,
        q2, q1, q4, scale, zero, lut,
        t["sparse_row_ptr"], t["sparse_col"], t["sparse_val"], bias if bias is not None else x,
        out, part,
        m, n, seg.k, seg.start, seg.group_size or 1, x_dense.stride(0), x.stride(0), prev_slices,
        BITS=seg.bits, IS_LUT=seg.decoder == "lut",
        GROUP_MODE=group_mode(seg, cfg["BLOCK_K"]),
        HAS_SPARSE=i == 0 and spec.nnz > 0, HAS_BIAS=bias is not None, DIRECT=direct, DOT_FP32=dot_in_fp32(x),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def gemm(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor | None = None, *, config: dict | None = None):
    """y = x @ (dequant(D) + S)^T + bias with the fused dequantize + ``tl.dot`` kernel, any M.

    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) forces one config for
    every segment, skipping tuning. Returns ``out``. fp32 x works but is meant for tests: on a GPU
    its ``tl.dot`` runs at IEEE precision on CUDA cores and these tiles spill registers, which is
    why :func:`tacq_kernels.kernels.linear` sends fp32 activations with M > 8 to ``prefill``.
    """
    out = check_call(x, layer, out, "gemm")
    m, n = x.shape[0], layer.spec.out_features
    if m == 0:
        return out
    perm = layer.perm
    x_dense = x.index_select(1, perm) if perm is not None else x

    def launch(i, cfg, out, part, prev, direct):
        _launch_segment(x_dense, x, layer, i, cfg, out, part, prev, direct)

    if config is not None:
        configs = [config] * len(layer.spec.segments)
    else:
        sms = tuning.num_sms(x.device)
        m_bucket = tuning.next_pow2(m)  # tune once per power of two of M, not per M
        configs = segment_configs(
            "gemm", x, m_bucket, layer, lambda seg: candidates(m_bucket, n, seg, sms), launch
        )
    return run_segments(layer, configs, out, launch)
