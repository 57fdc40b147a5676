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

# The M = 1 affine loop (``_gemv1_tile``) decodes a code field in place as a subnormal fp32: the
# word masked to the field, ``w & (mask << e)``, reinterpreted as fp32, IS q * 2^e * 2^-149
# exactly (no implicit leading one below the smallest exponent, and the exponent's lowest bit,
# bit 23, continues the mantissa linearly), for any field that ends at or below bit 23. One
# LOP3 then replaces shift + mask + int-to-float. The x pre-pass (``xprep_kernel``) multiplies
# each x by 2^(XP_S - e) for the field offset e its K row is decoded at, so every FFMA adds
# x * q * 2^(XP_S - 149), and the result is scaled back by 2^(149 - XP_S) after the loop (powers
# of two: exact). XP_S = 100 keeps x * 2^XP_S finite for |x| < 2^28 and products of fp16 x
# (>= 2^-24) far above the subnormal range.
XP_S = tl.constexpr(100)
XP_UNSCALE = tl.constexpr(2.0 ** (149 - 100))

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
# M = 1 affine (the x pre-pass loop, ``_gemv1_tile``): 512 x 64 on 4 warps gives each thread 4
# word rows x 4 columns, so one LDG.128 of x serves 16 weights (256 x 64: LDG.32 per 4 weights).
# SASS report, sm_90: 2.38 / 3.48 / 2.4 instructions per weight at 2 / 3 / 4 bits.
TILES_XPREP = [(512, 64, 4), (256, 64, 4), (512, 128, 8), (256, 128, 4), (128, 64, 4)]


def t_unroll(block_m: int, bits: int, decoder: str) -> int:
    """How far the loop over the bit positions of a word is unrolled (T_UNROLL).

    Fully unrolled, every shift is a constant; but ptxas then hoists the x and table loads of
    all steps, which for M > 1 or a 3/4-bit table (8-16 entries per K row) costs more registers
    than there are (compile checks: 250+ and spills), so those unroll by 2.
    """
    full = 8 if bits == 4 else 16
    return full if block_m == 1 and (decoder == "affine" or bits == 2) else 2


def uses_xprep(block_m: int, seg: SegmentSpec, block_k: int) -> bool:
    """Whether a launch runs the x pre-pass and the slim M = 1 loop (``_gemv1_tile``): M = 1,
    affine with one group per row or groups that are multiples of BLOCK_K, or a 2-bit table.
    The rest (3/4-bit tables, groups gathered per K row, M > 1) runs ``_gemv_tile``."""
    if block_m != 1:
        return False
    if seg.decoder == "lut":
        return seg.bits == 2
    return group_mode(seg, block_k) in (ONE_GROUP.value, GROUP_PER_CHUNK.value)


def candidates(m: int, n: int, seg: SegmentSpec, sms: int) -> list[dict]:
    """Configs worth timing for one segment: each tile for this BLOCK_M with the split-K count
    that gives about two programs per SM, then half and double that."""
    block_m = tuning.next_pow2(m)
    out = []
    tiles = TILES_XPREP if uses_xprep(block_m, seg, 64) else TILES[block_m]
    for block_n, block_k, warps in tiles:
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
def _xp_slot(i, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Where ``_gemv1_tile`` reads the x of chunk row ``i`` (offset in the chunk's slice of the
    pre-pass buffer) and the bit offset ``e`` its code field is decoded at.

    2/4-bit: the row is field t of word row r (i = r * VPW + t); slot t * R + r, so the R word rows
    of one step read R consecutive values. Fields that do not end at or below bit 23 (2-bit t >=
    12, 4-bit t >= 6) are decoded from the word shifted right by 24. 3-bit: word rows come in pairs
    (A = 2j, B = 2j + 1) sharing the 1-bit word j; the row is field t of word A or B (h = 0/1),
    decoded as a 4-bit-spaced field k = t // 2 of a merged word (see ``_dot3``); slot
    (h * 16 + t) * R / 2 + j.
    """
    VPW: tl.constexpr = 8 if BITS == 4 else 16
    R: tl.constexpr = BLOCK_K // VPW
    t = i % VPW
    r = i // VPW
    if BITS == 2:
        e = tl.where(t < 12, 2 * t, 2 * (t - 12))
        slot = t * R + r
    elif BITS == 4:
        e = tl.where(t < 6, 4 * t, 4 * (t - 6))
        slot = t * R + r
    else:
        k = t // 2
        e = tl.where(k < 6, 4 * k, 4 * (k - 6))
        slot = ((r % 2) * 16 + t) * (R // 2) + r // 2
    return slot, e


@triton.jit
def _pow2(e):
    return ((-e + (127 + XP_S)) << 23).to(tl.float32, bitcast=True)  # 2^(XP_S - e), exact


@triton.jit
def xprep_kernel(x_ptr, perm_ptr, lut_ptr, xp_ptr, xc_ptr, K_SEG, SEG_START,
                 BITS: tl.constexpr, HAS_PERM: tl.constexpr, IS_LUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The x pre-pass of the M = 1 GEMV (``_gemv1_tile``), one program per BLOCK_K chunk of a segment.

    x [K] (x's dtype, original column order); perm int32 [K] (HAS_PERM). Affine: writes xp fp32
    [n_chunks * BLOCK_K]: x of permuted column SEG_START + row, times 2^(XP_S - e), at the slot
    ``_xp_slot`` gives (0 past K_SEG, so the loop needs no K mask on x); and xc fp32 [n_chunks]:
    each chunk's sum of x (unscaled), for the zero points. The permutation is applied here, once
    per call, instead of by a gather per bit position in the loop.

    2-bit table (IS_LUT; lut fp16 [K_SEG, 4]): the row's table is multilinear in the code bits,
    T[q] = T0 + (T1 - T0) b0 + (T2 - T0) b1 + (T3 - T2 - T1 + T0) b0 b1, so xp holds per chunk
    three slices of BLOCK_K: x times each coefficient, scaled for the bit it multiplies (b0 and
    b0 b1 at bit e, b1 at e + 1), and xc the chunk's sum of x * T0.
    """
    c = tl.program_id(0)
    i = tl.arange(0, BLOCK_K)
    row = c * BLOCK_K + i
    live = row < K_SEG
    col = SEG_START + row
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=live, other=0)
    x = tl.load(x_ptr + col, mask=live, other=0.0).to(tl.float32)
    slot, e = _xp_slot(i, BITS, BLOCK_K)
    if IS_LUT:
        table = lut_ptr + row * 4
        t0 = tl.load(table, mask=live, other=0.0).to(tl.float32)
        t1 = tl.load(table + 1, mask=live, other=0.0).to(tl.float32)
        t2 = tl.load(table + 2, mask=live, other=0.0).to(tl.float32)
        t3 = tl.load(table + 3, mask=live, other=0.0).to(tl.float32)
        tl.store(xc_ptr + c, tl.sum(x * t0, axis=0))
        out = xp_ptr + c * 3 * BLOCK_K + slot
        tl.store(out, x * (t1 - t0) * _pow2(e))
        tl.store(out + BLOCK_K, x * (t2 - t0) * _pow2(e + 1))
        tl.store(out + 2 * BLOCK_K, x * ((t3 - t2) - (t1 - t0)) * _pow2(e))
    else:
        tl.store(xc_ptr + c, tl.sum(x, axis=0))
        tl.store(xp_ptr + c * BLOCK_K + slot, x * _pow2(e))


@triton.jit
def _fields(acc, w, x_ptr, rr, STEP: tl.constexpr, FIRST: tl.constexpr, COUNT: tl.constexpr,
            WIDTH: tl.constexpr, SPACING: tl.constexpr, IN_PLACE: tl.constexpr, R: tl.constexpr,
            OFFSET: tl.constexpr = 0):
    """acc += x * field for COUNT fields of the words ``w`` [R, BLOCK_N] (uint32): field k at bit
    SPACING * k + OFFSET, WIDTH bits, the first IN_PLACE masked in place, the others from
    ``w >> 24``. The x of field k is at x_ptr + (FIRST + STEP * k) * R + rr, pre-scaled by
    ``xprep_kernel``."""
    w_top = w >> 24
    for k in tl.static_range(COUNT):
        xk = tl.load(x_ptr + (FIRST + STEP * k) * R + rr)
        if k < IN_PLACE:
            f = (w & (((1 << WIDTH) - 1) << (SPACING * k + OFFSET))).to(tl.float32, bitcast=True)
        else:
            f = (w_top & (((1 << WIDTH) - 1) << (SPACING * (k - IN_PLACE) + OFFSET))).to(tl.float32, bitcast=True)
        acc += xk[:, None] * f
    return acc


@triton.jit
def _shuffle(h):
    """Outer perfect shuffle of 32-bit words: bit b of the low half goes to bit 2b, bit b of the
    high half to bit 2b + 1 (four delta swaps)."""
    t = (h ^ (h >> 8)) & 0x0000FF00
    h = h ^ t ^ (t << 8)
    t = (h ^ (h >> 4)) & 0x00F000F0
    h = h ^ t ^ (t << 4)
    t = (h ^ (h >> 2)) & 0x0C0C0C0C
    h = h ^ t ^ (t << 2)
    t = (h ^ (h >> 1)) & 0x22222222
    return h ^ t ^ (t << 1)


@triton.jit
def _dot3(acc, a, b, h, x_ptr, rr, R2: tl.constexpr):
    """3-bit: word rows A = 2j (``a``), B = 2j + 1 (``b``) of the 2-bit plane and the 1-bit word j
    (``h``: bit t for row t of A, bit 16 + t for row t of B), all [R2, BLOCK_N] uint32.

    After the shuffle, bit 2t of ``s`` is A's high bit of row t and bit 2t + 1 B's. One select
    (LOP3 with mask 0x33333333) merges the 2-bit fields of the even rows 2k of A (bits 4k, 4k+1)
    with their high bits moved to 4k + 2 (s << 2): a word of 3-bit codes at 4-bit spacing, bit
    4k + 3 junk that the field mask drops. The odd rows (a >> 2) and B's rows likewise.
    """
    s = _shuffle(h)
    LO: tl.constexpr = 0x33333333
    HI: tl.constexpr = 0xCCCCCCCC
    ea = (a & LO) | ((s << 2) & HI)
    oa = ((a >> 2) & LO) | (s & HI)
    eb = (b & LO) | ((s << 1) & HI)
    ob = ((b >> 2) & LO) | ((s >> 1) & HI)
    acc = _fields(acc, ea, x_ptr, rr, 2, 0, 8, 3, 4, 6, R2)
    acc = _fields(acc, oa, x_ptr, rr, 2, 1, 8, 3, 4, 6, R2)
    acc = _fields(acc, eb, x_ptr, rr, 2, 16, 8, 3, 4, 6, R2)
    acc = _fields(acc, ob, x_ptr, rr, 2, 17, 8, 3, 4, 6, R2)
    return acc


@triton.jit
def _gemv1_tile(
    xp_ptr, xc_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, N, K_SEG, GROUP_SIZE, chunk_begin, chunk_end,
    offs_n, mask_n, BITS: tl.constexpr, IS_LUT: tl.constexpr, GROUP_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y (fp32 [1, BLOCK_N]) for M = 1, affine, ONE_GROUP or GROUP_PER_CHUNK, over chunks
    [chunk_begin, chunk_end), reading x from the pre-pass (``xprep_kernel``: permuted, fp32,
    scaled per field, zero-padded, chunk sums in xc).

    Per weight: one LOP3 (the field masked in place, a subnormal fp32 equal to q * 2^(e - 149))
    and one FFMA with the pre-scaled x; per word a shift by 24 for the fields above bit 23; per
    step one load of R consecutive x values. 3-bit adds, per 32 rows, the shuffle of the 1-bit
    word and four selects (``_dot3``). No K mask but on the word loads, no int-to-float.
    A 2-bit table (IS_LUT, see ``xprep_kernel``): three single-bit fields per weight (b0, b1 and
    b0 b1 from ``w & (w >> 1)``), each one LOP3 + one FFMA, instead of a select tree.
    """
    if BITS == 3:
        R: tl.constexpr = BLOCK_K // 32  # pairs of 2-bit word rows, one 1-bit word row each
        ROWS: tl.constexpr = 32
    elif BITS == 4:
        R: tl.constexpr = BLOCK_K // 8
        ROWS: tl.constexpr = 8
    else:
        R: tl.constexpr = BLOCK_K // 16
        ROWS: tl.constexpr = 16
    rr = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_N), tl.float32)
    zacc = tl.zeros((BLOCK_N,), tl.float32)
    sum_x = 0.0
    for chunk in range(chunk_begin, chunk_end):
        chunk_start = chunk * BLOCK_K
        x_chunk = xp_ptr + chunk_start * (3 if IS_LUT else 1)
        mask = (chunk_start + rr * ROWS < K_SEG)[:, None] & mask_n[None, :]
        if GROUP_MODE == GROUP_PER_CHUNK:
            part = tl.zeros((R, BLOCK_N), tl.float32)
        else:
            part = acc
        if BITS == 3:
            w2 = q2_ptr + (chunk_start // 16 + 2 * rr)[:, None] * N + offs_n[None, :]
            a = tl.load(w2, mask=mask, other=0).to(tl.uint32, bitcast=True)
            b = tl.load(w2 + N, mask=mask, other=0).to(tl.uint32, bitcast=True)
            h = tl.load(q1_ptr + (chunk_start // 32 + rr)[:, None] * N + offs_n[None, :], mask=mask,
                        other=0).to(tl.uint32, bitcast=True)
            part = _dot3(part, a, b, h, x_chunk, rr, R)
        elif BITS == 4:
            w = tl.load(q4_ptr + (chunk_start // 8 + rr)[:, None] * N + offs_n[None, :], mask=mask,
                        other=0).to(tl.uint32, bitcast=True)
            part = _fields(part, w, x_chunk, rr, 1, 0, 8, 4, 4, 6, R)
        else:
            w = tl.load(q2_ptr + (chunk_start // 16 + rr)[:, None] * N + offs_n[None, :], mask=mask,
                        other=0).to(tl.uint32, bitcast=True)
            if IS_LUT:
                part = _fields(part, w, x_chunk, rr, 1, 0, 16, 1, 2, 12, R)  # b0
                part = _fields(part, w, x_chunk + BLOCK_K, rr, 1, 0, 16, 1, 2, 12, R, 1)  # b1
                part = _fields(part, w & (w >> 1), x_chunk + 2 * BLOCK_K, rr, 1, 0, 16, 1, 2, 12, R)  # b0 b1
            else:
                part = _fields(part, w, x_chunk, rr, 1, 0, 16, 2, 2, 12, R)
        xsum = tl.load(xc_ptr + chunk)
        if GROUP_MODE == GROUP_PER_CHUNK:
            g = chunk_start // GROUP_SIZE
            s = tl.load(scale_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            zacc += (s * z) * xsum
        else:
            acc = part
            sum_x += xsum
    y = tl.sum(acc, axis=0) * XP_UNSCALE
    if IS_LUT:
        y = y + sum_x  # sum of x * T0
    elif GROUP_MODE == ONE_GROUP:
        s1 = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z1 = tl.load(zero_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = s1 * (y - z1 * sum_x)
    else:
        y = y - zacc
    return y[None, :]


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
    x_ptr, perm_ptr, xp_ptr, xc_ptr,
    q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr,
    row_ptr_ptr, col_ptr, val_ptr, bias_ptr,
    out_ptr, part_ptr,
    M, N, K_SEG, SEG_START, GROUP_SIZE, stride_xm, prev_slices,
    BITS: tl.constexpr, IS_LUT: tl.constexpr, GROUP_MODE: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    T_UNROLL: tl.constexpr, XPREP: tl.constexpr,
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
    xp, xc   fp32, the x pre-pass of this segment (XPREP: M = 1 affine, see ``xprep_kernel``;
             then perm is not read by the loop)
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

    if XPREP:
        acc = _gemv1_tile(
            xp_ptr, xc_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, N, K_SEG, GROUP_SIZE, chunk_begin,
            chunk_end, offs_n, mask_n, BITS, IS_LUT, GROUP_MODE, BLOCK_N, BLOCK_K,
        )
    else:
        acc = _gemv_tile(
            x_ptr, perm_ptr, q2_ptr, q1_ptr, q4_ptr, scale_ptr, zero_ptr, lut_ptr, M, N, K_SEG, SEG_START,
            GROUP_SIZE, stride_xm, chunk_begin, chunk_end, offs_m, mask_m, offs_n, mask_n, BITS, IS_LUT, GROUP_MODE,
            HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, T_UNROLL,
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
    block_m, block_k = tuning.next_pow2(m), cfg["BLOCK_K"]
    xprep = uses_xprep(block_m, seg, block_k)
    xp = xc = x
    if xprep:  # one small launch per segment and call: x permuted, scaled, in fp32
        chunks = triton.cdiv(seg.k, block_k)
        features = 3 if seg.decoder == "lut" else 1
        xp = torch.empty(chunks * block_k * features, dtype=torch.float32, device=x.device)
        xc = torch.empty(chunks, dtype=torch.float32, device=x.device)
        xprep_kernel[(chunks,)](x, t.get("perm", x), lut, xp, xc, seg.k, seg.start, BITS=seg.bits,
                                HAS_PERM=spec.has_perm, IS_LUT=seg.decoder == "lut", BLOCK_K=block_k, num_warps=2)
    gemv_kernel[grid](
        x, t.get("perm", x), xp, xc,
        q2, q1, q4, scale, zero, lut,
        t["sparse_row_ptr"], t["sparse_col"], t["sparse_val"], bias if bias is not None else x,
        out, part,
        m, n, seg.k, seg.start, seg.group_size or 1, x.stride(0), prev_slices,
        BITS=seg.bits, IS_LUT=seg.decoder == "lut",
        GROUP_MODE=group_mode(seg, cfg["BLOCK_K"]),
        HAS_PERM=spec.has_perm, HAS_SPARSE=has_sparse, HAS_BIAS=bias is not None, DIRECT=direct,
        BLOCK_M=tuning.next_pow2(m), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        T_UNROLL=cfg.get("T_UNROLL") or t_unroll(tuning.next_pow2(m), seg.bits, seg.decoder), XPREP=xprep,
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
