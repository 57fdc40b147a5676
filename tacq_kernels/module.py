"""``QuantLinear``: a drop-in ``nn.Linear`` replacement backed by a format-v1 layer."""

from __future__ import annotations

import torch
from torch import nn

from . import ops, reference
from .format import LayerSpec, PackedLayer, validate_layer


class QuantLinear(nn.Module):
    """y = x @ (dequant(D) + S)^T + bias with the weight kept packed (2/3/4-bit codes + CSR).

    The layer's tensors are buffers named as in the checkpoint (``seg0_q2``, ``seg0_scale``,
    ``sparse_row_ptr``, ...; see docs/format.md), so ``state_dict()``, ``load_state_dict()`` and
    ``.to(device)`` behave as for any module. Their dtypes are part of the format: ``.to(dtype)``
    / ``.half()`` move them between devices but never change them.

    Inputs may have any leading shape and be fp32, fp16 or bf16; the output has the input's dtype.
    On CUDA the forward is one call of the ``tacq_kernels::quant_linear`` op, which picks the
    Triton kernel by the number of rows M inside the op (so ``torch.compile`` sees a single op and
    never recompiles for a new batch size); tune it before CUDA-graph capture with
    :func:`tacq_kernels.warmup`. On CPU the forward is the pure-PyTorch reference; with
    ``cache_dequantized=True`` (the default) the decoded fp32 weight is kept after the first call
    so that CPU generation is not dominated by decoding (the cache is dropped whenever the buffers
    move or are reloaded).

    Build one from a packed layer (:meth:`from_packed`) or, for loading, from a spec alone
    (``QuantLinear(spec)``, buffers allocated empty at the right shapes).
    """

    def __init__(self, spec: LayerSpec, name: str = "", device=None, cache_dequantized: bool = True):
        super().__init__()
        spec.check(name or None)
        self.spec = spec
        self.layer_name = name
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.cache_dequantized = cache_dequantized
        self._spec_ints = ops.spec_to_ints(spec)
        self._tensor_names = list(spec.tensor_specs())  # op argument order, computed once (decode is per-token)
        self._dense_cache: torch.Tensor | None = None
        for tname, (shape, dtype) in spec.tensor_specs().items():
            self.register_buffer(tname, torch.zeros(shape, dtype=dtype, device=device))
        self._register_load_state_dict_pre_hook(self._drop_cache_on_load)

    @classmethod
    def from_packed(cls, layer: PackedLayer, **kwargs) -> "QuantLinear":
        m = cls(layer.spec, name=layer.name, device=next(iter(layer.tensors.values())).device, **kwargs)
        with torch.no_grad():
            for tname, t in layer.tensors.items():
                getattr(m, tname).copy_(t)
        return m

    def tensor_names(self) -> list[str]:
        return list(self._tensor_names)

    def to_packed(self, check: bool = False) -> PackedLayer:
        """A :class:`PackedLayer` view of the buffers (no copy)."""
        return PackedLayer(self.spec, {n: getattr(self, n) for n in self.tensor_names()}, self.layer_name, check=check)

    def validate(self) -> None:
        """Check the buffers against the format (raises ``CheckpointError`` naming the tensor)."""
        validate_layer(self.layer_name, self.spec, {n: getattr(self, n) for n in self.tensor_names()})

    def dequantize(self) -> torch.Tensor:
        """The effective weight D + S as fp32 [out_features, in_features]."""
        return reference.dequantize(self.to_packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer_name or 'QuantLinear'}: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.cache_dequantized and x2.device.type == "cpu" and not torch.compiler.is_compiling():
            if self._dense_cache is None:
                self._dense_cache = self.dequantize()
            y = reference.linear(x2, self.to_packed(), weight=self._dense_cache)
        else:
            tensors = [getattr(self, n) for n in self._tensor_names]
            y = ops.quant_linear(x2.contiguous(), tensors, self._spec_ints)
        return y.reshape(*lead, self.out_features)

    # Buffers keep their format dtypes: apply only the device part of fn (module.to(dtype),
    # .half() and friends would otherwise turn fp16 scales into bf16 and break the format).
    def _apply(self, fn, recurse=True):
        for name, buf in list(self._buffers.items()):
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        self._dense_cache = None
        return self

    def _drop_cache_on_load(self, *args, **kwargs):
        self._dense_cache = None

    def extra_repr(self) -> str:
        s = self.spec
        bpw = s.bits_per_weight()
        decoders = "/".join(sorted({seg.decoder for seg in s.segments}))
        return (
            f"in_features={s.in_features}, out_features={s.out_features}, bits={s.describe_bits()}, "
            f"decoder={decoders}, segments={len(s.segments)}, nnz={s.nnz} ({100 * s.outlier_frac:.2f}%), "
            f"perm={s.has_perm}, bias={s.has_bias}, bpw={bpw['weights']:.2f}/{bpw['total']:.2f}"
        )
