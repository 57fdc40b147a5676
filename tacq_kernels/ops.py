"""Torch custom ops: the layer between kernels and modules.

``torch.ops.tacq_kernels.quant_linear(x, tensors, spec_ints)`` computes
``y = x @ (dequant(D) + S)^T + bias`` for one format-v1 layer:

* ``x``: fp16, bf16 or fp32 [M, K], contiguous in K.
* ``tensors``: the layer's tensors in the canonical order of :meth:`LayerSpec.tensor_specs`
  (``perm`` int32 [K] if present; per segment its planes int32 [K_pad*w/32, N] and either
  ``scale``/``zero`` fp16 [n_groups, N] or ``lut`` fp16 [k, 2^b]; ``sparse_row_ptr`` int32
  [N+1]; ``sparse_col`` int16/int32 [nnz]; ``sparse_val`` fp16 [nnz]; ``bias`` fp16 [N] if present).
* ``spec_ints``: the layer spec flattened by :func:`spec_to_ints`.
* returns: [M, N] in the dtype of ``x``.

The op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it.
CUDA tensors run the Triton kernels (:mod:`tacq_kernels.kernels`), or for M <= 8 the optional
CUDA C++ GEMV where ``TACQ_CUDA`` enables it (:mod:`tacq_kernels.cuda_ext`; off by default until a
GPU has verified it); the choice of kernel by M
happens inside the op (:func:`tacq_kernels.kernels.path_for`), so a compiled model sees one op
whatever the batch size and never recompiles for it. Other devices, and CUDA without Triton, run
the pure-PyTorch reference (:mod:`tacq_kernels.reference`).

Kernel configs are tuned (timed) the first time each shape and power-of-two batch bucket is
seen, which must not happen inside CUDA-graph capture: call :func:`warmup` first.
"""

from __future__ import annotations

import torch

from . import reference
from .format import DECODERS, LayerSpec, PackedLayer, SegmentSpec

_HEADER = 6  # in_features, out_features, has_perm, has_bias, nnz, n_segments
_PER_SEGMENT = 5  # start, end, bits, decoder id, group size (0 for lut)


def spec_to_ints(spec: LayerSpec) -> list[int]:
    """Flatten a :class:`LayerSpec` into the ``int[]`` argument of the ops."""
    out = [spec.in_features, spec.out_features, int(spec.has_perm), int(spec.has_bias), spec.nnz, len(spec.segments)]
    for s in spec.segments:
        out += [s.start, s.end, s.bits, DECODERS.index(s.decoder), s.group_size or 0]
    return out


def spec_from_ints(ints: list[int], col_dtype: torch.dtype) -> LayerSpec:
    k, n, has_perm, has_bias, nnz, nseg = ints[:_HEADER]
    segs = []
    for i in range(nseg):
        start, end, bits, dec, group = ints[_HEADER + _PER_SEGMENT * i : _HEADER + _PER_SEGMENT * (i + 1)]
        segs.append(SegmentSpec(start, end, bits, DECODERS[dec], group if DECODERS[dec] == "affine" else None))
    return LayerSpec(
        in_features=k,
        out_features=n,
        segments=tuple(segs),
        has_perm=bool(has_perm),
        has_bias=bool(has_bias),
        nnz=nnz,
        col_dtype="int16" if col_dtype == torch.int16 else "int32",
    )


def layer_from_op_args(tensors: list[torch.Tensor], spec_ints: list[int]) -> PackedLayer:
    """Rebuild a (trusted, unvalidated) :class:`PackedLayer` view from the op arguments."""
    nseg = spec_ints[5]
    # The canonical order ends with sparse_col, sparse_val[, bias].
    col = tensors[-3] if spec_ints[3] else tensors[-2]
    spec = spec_from_ints(spec_ints, col.dtype)
    names = list(spec.tensor_specs())
    if len(names) != len(tensors):
        raise ValueError(f"quant_linear: expected {len(names)} tensors for a {nseg}-segment layer, got {len(tensors)}")
    return PackedLayer(spec, dict(zip(names, tensors)), check=False)


def _check_input(x: torch.Tensor, spec_ints: list[int]) -> None:
    if x.dim() != 2:
        raise ValueError(f"quant_linear: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != spec_ints[0]:
        raise ValueError(f"quant_linear: x has K={x.shape[1]}, the layer has in_features={spec_ints[0]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quant_linear: x must be fp16, bf16 or fp32, got {x.dtype}")


@torch.library.custom_op("tacq_kernels::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, tensors: list[torch.Tensor], spec_ints: list[int]) -> torch.Tensor:
    """y = x @ (dequant(D) + S)^T + bias; see the module docstring for every argument."""
    _check_input(x, spec_ints)
    layer = layer_from_op_args(tensors, spec_ints)
    return reference.linear(x, layer)


@quant_linear.register_kernel("cuda")
def _quant_linear_cuda(x: torch.Tensor, tensors: list[torch.Tensor], spec_ints: list[int]) -> torch.Tensor:
    _check_input(x, spec_ints)
    layer = layer_from_op_args(tensors, spec_ints)
    if not _triton_available():
        return reference.linear(x, layer)
    from . import cuda_ext, kernels

    x = x if x.stride(1) == 1 else x.contiguous()
    # The CUDA C++ GEMV (csrc/, docs/cuda.md) only where TACQ_CUDA allows it: off by default.
    if cuda_ext.use_cuda(x, layer):  # checks TACQ_CUDA first, then M <= MAX_M, dtype, layout
        return torch.ops.tacq_cuda.gemv(x, tensors, spec_ints)
    return kernels.linear(x, layer)


_TRITON: bool | None = None


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


@quant_linear.register_fake
def _quant_linear_fake(x: torch.Tensor, tensors: list[torch.Tensor], spec_ints: list[int]) -> torch.Tensor:
    _check_input(x, spec_ints)
    return x.new_empty((x.shape[0], spec_ints[1]))


DEFAULT_WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def warmup_layers(layers, batch_sizes=DEFAULT_WARMUP_BATCH_SIZES, dtype: torch.dtype = torch.float16) -> int:
    """Tune and compile the kernels of CUDA layers given as op arguments, for ``batch_sizes``.

    ``layers``: an iterable of ``(tensors, spec_ints)`` pairs, the arguments of
    :func:`quant_linear` (a :class:`QuantLinear`'s buffers, or an engine's shards such as the vLLM
    plugin's). Call it before CUDA-graph capture: kernel configs are timed the first time a layer
    shape meets a batch-size bucket (powers of two; M = 3 uses M = 4's), and timing cannot happen
    inside capture (a shape first seen there falls back to an untuned config, with a warning).
    Layers with the same spec (nnz counted only as zero or not) run once. CPU layers are skipped.
    Returns the number of forward calls made.
    """
    seen = set()
    calls = 0
    with torch.no_grad():
        for tensors, spec_ints in layers:
            device = tensors[0].device
            if device.type != "cuda":
                continue
            ints = list(spec_ints)
            ints[4] = int(ints[4] > 0)  # nnz only matters as zero / non-zero for tuning
            col = tensors[-3] if spec_ints[3] else tensors[-2]
            signature = (tuple(ints), col.dtype, device)
            if signature in seen:
                continue
            seen.add(signature)
            for m in batch_sizes:
                quant_linear(torch.zeros(m, spec_ints[0], dtype=dtype, device=device), list(tensors), list(spec_ints))
                calls += 1
    if calls:
        torch.cuda.synchronize()
    return calls


def warmup(
    model: torch.nn.Module, batch_sizes=DEFAULT_WARMUP_BATCH_SIZES, dtype: torch.dtype | None = None
) -> int:
    """Tune and compile the kernels of every CUDA ``QuantLinear`` in ``model`` for ``batch_sizes``.

    Call it once after loading and before capturing CUDA graphs (or before serving); see
    :func:`warmup_layers`. ``dtype`` is the activation dtype (default: the dtype of the model's
    first floating-point parameter, else fp16). Returns the number of forward calls made.
    """
    from .module import QuantLinear

    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    return warmup_layers(
        (([getattr(m, n) for n in m._tensor_names], m._spec_ints) for m in model.modules() if isinstance(m, QuantLinear)),
        batch_sizes, dtype,
    )
