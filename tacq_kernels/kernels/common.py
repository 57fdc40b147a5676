"""Pieces shared by the kernels: bit-plane decoding, the fused CSR walk, the split-K protocol.

Everything here reads the canonical format-v1 layout in place (docs/format.md): a w-bit plane is
int32 [K_pad * w / 32, N], N fastest, word ``r`` of column ``n`` holding the codes of K rows
``r * 32/w .. r * 32/w + 32/w - 1`` little-endian. Kernels walk K in chunks of BLOCK_K rows,
BLOCK_K a multiple of 32 and chunks starting at multiples of BLOCK_K. With VPW = 16 codes per
word of the 2-bit plane (8 for the 4-bit plane), K row ``chunk_start + r*VPW + t`` is bit-field
``t`` of word row ``chunk_start / VPW + r``: the field offsets depend on ``t`` only and are
compile-time constants. For 3-bit codes, the matching 1-bit plane word is row
``chunk_start / 32 + r // 2``, bit ``16 * (r % 2) + t`` (see :func:`load_words`).

Note for readers of the kernels: apart from ``tl.dot`` operands they never compute on fp16/bf16
values; loads are converted to fp32 first (the accumulation is fp32 anyway). Triton's interpreter
(the CPU test path) stores bf16 as raw uint16 and supports neither bf16 arithmetic nor a bf16
``tl.dot`` (triton-lang/triton#11584), so the GEMM takes a ``DOT_FP32`` switch that the launcher
sets only under the interpreter (and for fp32 activations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import PackedLayer, SegmentSpec

# Affine group handling, chosen per launch (the GROUP_MODE constexpr). tl.constexpr because
# @triton.jit code may only read module globals of that type.
ONE_GROUP = tl.constexpr(0)  # one scale/zero per row for the whole segment: y = s * (sum q x - z * sum x) at the end
GROUP_PER_CHUNK = tl.constexpr(1)  # group_size a multiple of BLOCK_K: one scale/zero per chunk, after its sum
GROUP_PER_ROW = tl.constexpr(2)  # anything else: scale/zero gathered per K row (any group size, slower)


def group_mode(seg: SegmentSpec, block_k: int) -> int:
    """How the kernels apply an affine segment's scales and zeros for a given BLOCK_K."""
    if seg.decoder != "affine" or seg.group_size >= seg.k:
        return ONE_GROUP.value
    if seg.group_size % block_k == 0:
        return GROUP_PER_CHUNK.value
    return GROUP_PER_ROW.value


@triton.jit
def load_words(q2_ptr, q1_ptr, q4_ptr, chunk_start, rr, mask_r, offs_n, mask_n, N, BITS: tl.constexpr):
    """The plane words of a chunk as (lo, hi) int32 [R, BLOCK_N], R = BLOCK_K / VPW, where VPW
    (values per word) is 8 for 4-bit codes and 16 otherwise. Rows outside ``mask_r`` read 0.

    Row r of ``lo`` is the 4-bit or 2-bit plane word of K rows chunk_start + r*VPW + t, t < VPW.
    For 3-bit, ``hi`` is the 1-bit plane word of the same rows, shifted so that its bit t belongs
    to K row chunk_start + r*16 + t (two 2-bit words share one 1-bit word); otherwise hi = lo.
    """
    mask = mask_r[:, None] & mask_n[None, :]
    # As uint32, shifts are logical: no sign extension to undo when extracting fields.
    if BITS == 4:
        lo = tl.load(q4_ptr + (chunk_start // 8 + rr)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        hi = lo
    else:
        lo = tl.load(q2_ptr + (chunk_start // 16 + rr)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        hi = lo
        if BITS == 3:
            hi = tl.load(q1_ptr + (chunk_start // 32 + rr // 2)[:, None] * N + offs_n[None, :], mask=mask, other=0)
            hi = hi.to(tl.uint32, bitcast=True) >> ((rr % 2) * 16).to(tl.uint32)[:, None]
    return lo, hi


@triton.jit
def load_codes(q2_ptr, q1_ptr, q4_ptr, chunk_start, K_SEG, offs_n, mask_n, N,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes int32 [BLOCK_K, BLOCK_N] of the segment-local K rows chunk_start .. +BLOCK_K.

    Loads each plane word once ([BLOCK_K / VPW, BLOCK_N], the packed size: what the software
    pipeline stages through shared memory) and expands it in registers with a [VPW] vector of
    constant shifts; row r*VPW + t of the result is bit-field t of word row r.
    """
    VPW: tl.constexpr = 8 if BITS == 4 else 16
    R: tl.constexpr = BLOCK_K // VPW
    rr = tl.arange(0, R)
    lo, hi = load_words(q2_ptr, q1_ptr, q4_ptr, chunk_start, rr, chunk_start + rr * VPW < K_SEG, offs_n, mask_n,
                        N, BITS)
    t = tl.arange(0, VPW)
    if BITS == 4:
        q = (lo[:, None, :] >> (4 * t)[None, :, None]) & 15
    else:
        q = (lo[:, None, :] >> (2 * t)[None, :, None]) & 3
        if BITS == 3:
            q = q | (((hi[:, None, :] >> t[None, :, None]) & 1) << 2)
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _select4(lo_bit, hi_bit, row_ptr, first: tl.constexpr, mask_rows, mult):
    """Entries ``first .. first+3`` of each K row's table, picked by two code bits (3 selects)."""
    t0 = (tl.load(row_ptr + first, mask=mask_rows, other=0.0).to(tl.float32) * mult)[:, None]
    t1 = (tl.load(row_ptr + first + 1, mask=mask_rows, other=0.0).to(tl.float32) * mult)[:, None]
    t2 = (tl.load(row_ptr + first + 2, mask=mask_rows, other=0.0).to(tl.float32) * mult)[:, None]
    t3 = (tl.load(row_ptr + first + 3, mask=mask_rows, other=0.0).to(tl.float32) * mult)[:, None]
    return tl.where(hi_bit, tl.where(lo_bit, t3, t2), tl.where(lo_bit, t1, t0))


@triton.jit
def decode_lut(q, lut_ptr, rows, mask_rows, mult, BITS: tl.constexpr):
    """``mult[r] * lut[rows[r], q[r, n]]`` as fp32 [R, BLOCK_N], by a select tree over the code bits.

    ``q`` int32 [R, BLOCK_N] holds the codes of the segment-local K rows ``rows`` [R]. The
    per-column table (``lut`` fp16 [k_seg, 2^BITS], one row per K row) is read as 2^BITS vectors
    of R values shared by all BLOCK_N output columns; each weight then costs 2^BITS - 1 selects
    (3 / 7 / 15) and no memory access. ``mult`` lets the GEMV fold x into the table for M = 1
    (the select tree then yields x * w directly).
    """
    row_ptr = lut_ptr + rows * (1 << BITS)
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    w = _select4(b0, b1, row_ptr, 0, mask_rows, mult)
    if BITS >= 3:
        b2 = (q & 4) != 0
        w = tl.where(b2, _select4(b0, b1, row_ptr, 4, mask_rows, mult), w)
        if BITS == 4:
            b3 = (q & 8) != 0
            w_hi = tl.where(
                b2, _select4(b0, b1, row_ptr, 12, mask_rows, mult), _select4(b0, b1, row_ptr, 8, mask_rows, mult)
            )
            w = tl.where(b3, w_hi, w)
    return w


@triton.jit
def decode_affine_per_row(q, scale_ptr, zero_ptr, rows, mask_rows, offs_n, mask_n, N, GROUP_SIZE):
    """``(q - zero[g, n]) * scale[g, n]`` (fp32) with the group ``g`` looked up for each of the
    segment-local K rows ``rows`` [R] of the codes ``q`` [R, BLOCK_N]."""
    g = rows // GROUP_SIZE
    mask = mask_rows[:, None] & mask_n[None, :]
    offs = g[:, None] * N + offs_n[None, :]
    s = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def csr_tile(
    acc, x_ptr, stride_xm, offs_m, mask_m, row_ptr_ptr, col_ptr, val_ptr, offs_n, mask_n, part, N_PARTS: tl.constexpr
):
    """Add ``x[m, col] * val`` for the CSR entries of this program's output columns to ``acc``.

    ``acc`` is fp32 [BLOCK_M, BLOCK_N]; ``x`` is in the ORIGINAL column order (the CSR's). The
    split-K programs of one output tile share the work: program ``part`` of ``N_PARTS`` takes
    entries ``part, part + N_PARTS, ...`` of every row, so no program carries the whole sparse
    load. The loop runs to the longest row of the tile; shorter rows are masked.
    """
    start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
    end = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0)
    longest = tl.max(end - start, axis=0)
    for i in range(part, longest, N_PARTS):
        entry = start + i
        live = entry < end
        col = tl.load(col_ptr + entry, mask=live, other=0).to(tl.int32)
        val = tl.load(val_ptr + entry, mask=live, other=0.0).to(tl.float32)
        xv = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=mask_m[:, None] & live[None, :], other=0.0
        ).to(tl.float32)
        acc += xv * val[None, :]
    return acc


@triton.jit
def write_tile(
    acc, out_ptr, part_ptr, bias_ptr, offs_m, mask_m, offs_n, mask_n, M, N, pid_k, prev_slices,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
):
    """Store an fp32 [BLOCK_M, BLOCK_N] tile of split ``pid_k``.

    Segments run one launch after another on the same stream, and split ``pid_k`` of every
    segment owns slice ``pid_k`` of the fp32 workspace [P, M, N]: a slice that an earlier segment
    already wrote (``pid_k < prev_slices``) is read and added to, the others are overwritten, so
    no memset and no atomics are needed. DIRECT (the last segment, every split count 1) adds the
    bias and writes the output in x's dtype instead of the workspace.
    """
    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    slice_ptr = part_ptr + pid_k.to(tl.int64) * M * N + tile
    if pid_k < prev_slices:
        acc += tl.load(slice_ptr, mask=mask, other=0.0)
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(slice_ptr, acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, P, MN, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out [M, N] (x's dtype, contiguous) = sum over P slices of part fp32 [P, M, N] (+ bias fp16 [N]).

    Summing the slices in a fixed order keeps results deterministic (no atomics), and the same
    pass does the cast that Triton's missing bf16 atomics would force anyway.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    slice_ptr = part_ptr + offs
    for _ in range(0, P):
        acc += tl.load(slice_ptr, mask=mask, other=0.0)
        slice_ptr += MN
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_slices(part: torch.Tensor, n_slices: int, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Launch :func:`splitk_reduce_kernel` over the first ``n_slices`` slices of ``part``."""
    m, n = out.shape
    block = 1024
    splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        part, bias if bias is not None else part, out, n_slices, m * n, n,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )


def run_segments(layer: PackedLayer, configs: list[dict], out: torch.Tensor, launch) -> torch.Tensor:
    """Launch every segment, then (if needed) the split-K reduction; see :func:`write_tile`.

    ``launch(i, cfg, out, part, prev_slices, direct)`` launches segment ``i`` with config ``cfg``.
    Launches: one per segment when every SPLIT_K is 1, else one per segment plus the reduction.
    """
    m, n = out.shape
    slices = max(cfg["SPLIT_K"] for cfg in configs)
    single = len(configs) == 1 and slices == 1
    part = out if single else out.new_empty((slices, m, n), dtype=torch.float32)
    prev = 0
    for i, cfg in enumerate(configs):
        direct = slices == 1 and i == len(configs) - 1
        launch(i, cfg, out, part, prev, direct)
        prev = max(prev, cfg["SPLIT_K"])
    if slices > 1:
        reduce_slices(part, slices, layer.bias, out)
    return out


def segment_configs(kind: str, x: torch.Tensor, m_key: int, layer: PackedLayer, candidates, launch) -> list[dict]:
    """The tuned config of every segment (see :mod:`.tuning`).

    ``candidates(seg)`` lists a segment's configs, default first; ``launch`` is as for
    :func:`run_segments`. A candidate is timed as a one-segment layer would run with it:
    its kernel plus, when it splits K, the reduction.
    """
    from . import tuning

    spec = layer.spec
    m, n = x.shape[0], spec.out_features
    configs = []
    for i, seg in enumerate(spec.segments):
        key = (
            kind, m_key, n, seg.k, seg.bits, seg.decoder, seg.group_size or 0, spec.has_perm,
            i == 0 and spec.nnz > 0, spec.has_bias, str(x.dtype),
        )

        def bench(cfg, i=i):
            scratch = x.new_empty((m, n))
            run_segments(layer, [cfg], scratch, lambda _, c, o, part, prev, direct: launch(i, c, o, part, prev, direct))

        configs.append(tuning.pick(key, candidates(seg), bench, x.device))
    return configs


# --------------------------------------------------------------------------------------------
# Host-side helpers shared by the launchers.
# --------------------------------------------------------------------------------------------


def segment_args(layer: PackedLayer, i: int) -> tuple[torch.Tensor, ...]:
    """(q2, q1, q4, scale, zero, lut) of segment ``i``; absent ones are replaced by a harmless
    tensor of the segment (the kernels never read them, Triton only needs a pointer)."""
    t = layer.segment_tensors(i)
    anchor = t.get("q2", t.get("q4"))
    return tuple(t.get(name, anchor) for name in ("q2", "q1", "q4", "scale", "zero", "lut"))


def check_call(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor | None, what: str) -> torch.Tensor:
    """Validate the launcher arguments and return the output buffer (allocated if ``out`` is None)."""
    spec = layer.spec
    if x.dim() != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"{what}: x must be [M, {spec.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what}: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"{what}: x must be contiguous in K")
    shape = (x.shape[0], spec.out_features)
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(
            f"{what}: out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def dot_in_fp32(x: torch.Tensor) -> bool:
    """Whether ``tl.dot`` must take fp32 operands: fp32 activations, or bf16 under the interpreter."""
    from .tuning import interpreting

    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting())
