"""Compile the kernels for NVIDIA GPUs without a GPU and report registers, spills, shared memory.

    python -m tacq_kernels.kernels.compile_check [--arch 80 90] [--quick | --smoke]

Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) runs on the CPU given a
target, and ``cuobjdump`` (shipped with Triton) reads the cubin's resource usage. That catches
what the interpreter cannot: code the GPU compiler rejects, tl.dot shapes and dtypes it does not
support, and configs that spill registers to local memory or need more shared memory than the
GPU has. It says nothing about speed. The configs checked are exactly the launchers' candidate
lists (``gemv.candidates`` and ``gemm.candidates``) for every bit-width and decoder, fp16 and bf16.

Run it with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from ..format import SegmentSpec
from .common import group_mode, splitk_reduce_kernel
from .gemm import candidates as gemm_candidates
from .gemm import gemm_kernel
from .gemv import candidates as gemv_candidates
from .gemv import gemv_kernel, uses_xprep
from .prefill import DEQUANT_BLOCK_K, DEQUANT_BLOCK_N, FOLD_BLOCK_N, csr_fold_kernel, dequant_kernel
from .sass import cuobjdump

# A few spilled bytes (ptxas sometimes keeps one value in local memory, outside the hot loop) are
# reported but not counted as a problem.
MINOR_SPILL_BYTES = 16
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int16: "i16"}


@dataclass
class Usage:
    registers: int
    spill_bytes: int  # STACK frame from cuobjdump: spilled registers (0 when nothing spills)
    shared_bytes: int  # dynamic shared memory Triton allocates (pipeline buffers, reductions, layouts)


def _probe(dtype):
    return torch.empty(1, dtype=dtype)


def compile_cubin(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile ``fn`` for sm_<arch> as the JIT would specialise these arguments: (cubin bytes,
    dynamic shared memory in bytes). The one compile path of this module and of ``sass_report``.

    Like the JIT: integers equal to 1 become constants, integers divisible by 16 and (16-byte
    aligned) pointers carry a divisibility hint.
    """
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel.asm["cubin"], kernel.metadata.shared


def cubin_usage(cubin: bytes, shared_bytes: int) -> Usage:
    """Registers and spilled bytes of a cubin (``cuobjdump --dump-resource-usage``)."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return Usage(int(found[1]), int(found[2]), shared_bytes)


def compile_usage(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> Usage:
    """Compile ``fn`` (see :func:`compile_cubin`) and measure its registers, spills, shared memory."""
    return cubin_usage(*compile_cubin(fn, args, constexprs, arch, num_warps, num_stages))


# Representative shapes: a Llama-7B-sized segment; only divisibility and constancy matter here.
N, K = 4096, 4096


def _segment(bits: int, decoder: str, group: str) -> SegmentSpec:
    group_size = {"row": K, "g128": 128, "g48": 48}[group] if decoder == "affine" else None
    return SegmentSpec(0, K, bits, decoder, group_size)


def _layer_args(x_dtype):
    f16, i32 = _probe(torch.float16), _probe(torch.int32)
    return dict(q2_ptr=i32, q1_ptr=i32, q4_ptr=i32, scale_ptr=f16, zero_ptr=f16, lut_ptr=f16, row_ptr_ptr=i32,
                col_ptr=_probe(torch.int16), val_ptr=f16, bias_ptr=f16, out_ptr=_probe(x_dtype),
                part_ptr=_probe(torch.float32))


def gemv_jobs(m: int, seg: SegmentSpec, x_dtype, quick: bool, has_perm: bool = True):
    """(kernel, args, constexprs, num_warps, num_stages, label) for each GEMV candidate."""
    cands = gemv_candidates(m, N, seg, sms=132)
    seen = set()
    for cfg in cands[:1] if quick else cands:
        tile = (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"])
        if tile in seen:
            continue  # other split counts of a tile change only a loop step: one compile per tile
        seen.add(tile)
        args = dict(x_ptr=_probe(x_dtype), perm_ptr=_probe(torch.int32), xp_ptr=_probe(torch.float32),
                    xc_ptr=_probe(torch.float32), **_layer_args(x_dtype), M=m, N=N,
                    K_SEG=seg.k, SEG_START=0, GROUP_SIZE=seg.group_size or 1, stride_xm=K, prev_slices=0)
        block_m = triton.next_power_of_2(m)
        cx = dict(BITS=seg.bits, IS_LUT=seg.decoder == "lut", GROUP_MODE=group_mode(seg, cfg["BLOCK_K"]),
                  HAS_PERM=has_perm, HAS_SPARSE=True, HAS_BIAS=True, DIRECT=False, BLOCK_M=block_m,
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"], T_UNROLL=cfg["T_UNROLL"],
                  XPREP=uses_xprep(block_m, seg, cfg["BLOCK_K"]))
        label = f"gemv M={m} {cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} u{cfg['T_UNROLL']}"
        yield gemv_kernel, args, cx, cfg["num_warps"], cfg["num_stages"], label


def gemm_jobs(m: int, seg: SegmentSpec, x_dtype, quick: bool):
    cands = gemm_candidates(m, N, seg, sms=132)
    seen = set()
    for cfg in cands[:1] if quick else cands:
        tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"])
        if tile in seen:
            continue
        seen.add(tile)
        args = dict(x_ptr=_probe(x_dtype), x_orig_ptr=_probe(x_dtype), **_layer_args(x_dtype), M=m, N=N,
                    K_SEG=seg.k, SEG_START=0, GROUP_SIZE=seg.group_size or 1, stride_xm=K, stride_xom=K,
                    prev_slices=0)
        cx = dict(BITS=seg.bits, IS_LUT=seg.decoder == "lut", GROUP_MODE=group_mode(seg, cfg["BLOCK_K"]),
                  HAS_SPARSE=True, HAS_BIAS=True, DIRECT=False, DOT_FP32=x_dtype == torch.float32,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"])
        label = "gemm M={} {}x{}x{} w{} s{}".format(m, *tile)
        yield gemm_kernel, args, cx, cfg["num_warps"], cfg["num_stages"], label


def prefill_jobs(seg: SegmentSpec, x_dtype, has_perm: bool = True):
    """The prefill path's dequantize and fold kernels, and the split-K reduction."""
    f16, i32 = _probe(torch.float16), _probe(torch.int32)
    args = dict(perm_ptr=i32, q2_ptr=i32, q1_ptr=i32, q4_ptr=i32, scale_ptr=f16, zero_ptr=f16, lut_ptr=f16,
                wt_ptr=_probe(x_dtype), N=N, K_SEG=seg.k, SEG_START=0, GROUP_SIZE=seg.group_size or 1)
    cx = dict(BITS=seg.bits, IS_LUT=seg.decoder == "lut", HAS_PERM=has_perm,
              BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K)
    yield dequant_kernel, args, cx, 4, 2, "dequant"
    fold_args = dict(row_ptr_ptr=i32, col_ptr=_probe(torch.int16), val_ptr=f16, wt_ptr=_probe(x_dtype), N=N)
    yield csr_fold_kernel, fold_args, dict(BLOCK_N=FOLD_BLOCK_N), 4, 2, "csr_fold"
    reduce_args = dict(part_ptr=_probe(torch.float32), bias_ptr=f16, out_ptr=_probe(x_dtype), P=4, MN=7 * N, N=N)
    yield splitk_reduce_kernel, reduce_args, dict(HAS_BIAS=True, BLOCK=1024), 4, 2, "splitk_reduce"


SEGMENTS = [(bits, "affine", group) for bits in (2, 3, 4) for group in ("row", "g128", "g48")] + [
    (bits, "lut", "-") for bits in (2, 3, 4)
]


def smoke_jobs():
    """A short list for the test suite: the default config of a few representative cases."""
    for x_dtype, (bits, decoder, group) in [
        (torch.float16, (3, "affine", "row")),
        (torch.bfloat16, (2, "affine", "g128")),
        (torch.bfloat16, (4, "lut", "-")),
    ]:
        seg = _segment(bits, decoder, group)
        name = f"{_TYPES[x_dtype]} {bits}b {decoder} {group}"
        for m in (1, 8):
            yield from ((name, job) for job in gemv_jobs(m, seg, x_dtype, quick=True))
        for m in (16, 256):
            yield from ((name, job) for job in gemm_jobs(m, seg, x_dtype, quick=True))
        yield from ((name, job) for job in prefill_jobs(seg, x_dtype))


def all_jobs(quick: bool = False, dtypes=(torch.float16, torch.bfloat16)):
    for x_dtype in dtypes:
        for bits, decoder, group in SEGMENTS:
            seg = _segment(bits, decoder, group)
            name = f"{_TYPES[x_dtype]} {bits}b {decoder} {group}"
            for m in (1, 2, 4, 8):
                for job in gemv_jobs(m, seg, x_dtype, quick):
                    yield name, job
            for m in (16, 64, 256):
                for job in gemm_jobs(m, seg, x_dtype, quick):
                    yield name, job
            for job in prefill_jobs(seg, x_dtype):
                yield name, job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (80 = A100, 90 = H100)")
    parser.add_argument("--quick", action="store_true", help="only the default (first) config of each case")
    parser.add_argument("--smoke", action="store_true", help="a few representative cases (what the tests run)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    bad = 0
    for arch in args.arch:
        jobs = smoke_jobs() if args.smoke else all_jobs(args.quick)
        for name, (fn, kargs, cx, warps, stages, label) in jobs:
            usage = compile_usage(fn, kargs, cx, arch, warps, stages)
            problem = usage.spill_bytes > MINOR_SPILL_BYTES or usage.shared_bytes > SHARED_LIMIT[arch]
            note = "  <-- PROBLEM" if problem else ("  (minor spill)" if usage.spill_bytes else "")
            bad += problem
            print(f"sm_{arch} {name:24s} {label:36s} regs {usage.registers:3d} spill {usage.spill_bytes:5d} "
                  f"smem {usage.shared_bytes // 1024:4d}K{note}", flush=True)
    print(f"{bad} problem config(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
