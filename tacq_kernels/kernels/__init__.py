"""Triton kernels for format-v1 layers: y = x @ (dequant(D) + S)^T + bias, x [M, K].

Three paths, chosen by M (:func:`path_for`; the thresholds are design choices not yet measured
on a GPU, see docs/kernels.md):

* :func:`gemv` (M <= 8): split-K GEMV on CUDA cores, scale/zero once per group, CSR fused;
* :func:`gemm` (8 < M <= 1024): dequantize in registers + ``tl.dot``, CSR fused;
* :func:`prefill` (M > 1024, and fp32 activations with M > 8): dequantize to x's dtype with the
  CSR folded in, then cuBLAS.

Each launcher reads a :class:`~tacq_kernels.format.PackedLayer` in the canonical on-disk layout
(no repacking), accepts ``out=`` (a contiguous [M, N] tensor of x's dtype) and returns it. They
run CUDA tensors on the GPU and, with ``TRITON_INTERPRET=1``, CPU tensors in Triton's interpreter
(how the CPU tests exercise every path). :func:`linear` dispatches by M; it is what the
``tacq_kernels::quant_linear`` op runs for CUDA tensors.
"""

from __future__ import annotations

import torch

from ..format import PackedLayer
from .gemm import gemm
from .gemv import gemv
from .prefill import dequantize, dequantize_t, prefill
from .tuning import clear_cache, load_cache, save_cache

GEMV_MAX_M = 8
GEMM_MAX_M = 1024


def path_for(m: int, dtype: torch.dtype) -> str:
    """Which kernel path :func:`linear` takes for M rows of ``dtype`` activations."""
    if m <= GEMV_MAX_M:
        return "gemv"
    # fp32 operands would make tl.dot run at IEEE precision on CUDA cores; cuBLAS does better.
    if m <= GEMM_MAX_M and dtype != torch.float32:
        return "gemm"
    return "prefill"


_PATHS = {"gemv": gemv, "gemm": gemm, "prefill": prefill}


def linear(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (dequant(D) + S)^T + bias through the path :func:`path_for` picks."""
    return _PATHS[path_for(x.shape[0], x.dtype)](x, layer, out)


__all__ = [
    "GEMM_MAX_M",
    "GEMV_MAX_M",
    "clear_cache",
    "dequantize",
    "dequantize_t",
    "gemm",
    "gemv",
    "linear",
    "load_cache",
    "path_for",
    "prefill",
    "save_cache",
]
