"""Checkpoint format v1: layer specs, packed layers, validation, safetensors I/O.

This module is the one implementation of the format described in docs/format.md. A quantized
linear layer W [N = out_features, K = in_features] is a :class:`LayerSpec` (shapes only; it lives
in ``config.json`` so that modules can be built before weights load) plus a dict of named tensors
(:class:`PackedLayer`). Every reader validates what it reads with :func:`validate_layer`, and every
error is a :class:`CheckpointError` that names the layer and the tensor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import InitVar, dataclass
from typing import Iterable, Mapping

import torch

from .packing import SUPPORTED_BITS, pack_codes, plane_layout, plane_rows, unpack_codes

QUANT_METHOD = "tacq_kernels"
FORMAT_VERSION = 1
DECODERS = ("affine", "lut")
COL_DTYPES = {"int16": torch.int16, "int32": torch.int32}
# int16 column indices are used while every index fits a signed 16-bit integer.
INT16_MAX_K = 2**15


class CheckpointError(ValueError):
    """A checkpoint (or an in-memory packed layer) that does not follow format v1."""

    def __init__(self, message: str, layer: str | None = None, tensor: str | None = None):
        where = []
        if layer is not None:
            where.append(f"layer '{layer}'")
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.layer = layer
        self.tensor = tensor


# --------------------------------------------------------------------------------------------
# Specs: what config.json says about a layer (shapes, bit-widths, nnz), no tensors.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSpec:
    """A contiguous run ``[start, end)`` of (permuted) input columns with one bit-width and decoder.

    ``group_size`` is the number of columns sharing one affine scale/zero (``end - start`` means
    one group per row); it is ``None`` for LUT segments.
    """

    start: int
    end: int
    bits: int
    decoder: str
    group_size: int | None = None

    @property
    def k(self) -> int:
        return self.end - self.start

    @property
    def n_groups(self) -> int:
        return -(-self.k // self.group_size) if self.decoder == "affine" else 0

    def to_dict(self) -> dict:
        d = {"start": self.start, "end": self.end, "bits": self.bits, "decoder": self.decoder}
        if self.decoder == "affine":
            d["group_size"] = self.group_size
        return d


@dataclass(frozen=True)
class LayerSpec:
    """Shapes and settings of one quantized linear layer (the per-layer entry of config.json)."""

    in_features: int
    out_features: int
    segments: tuple[SegmentSpec, ...]
    has_perm: bool = False
    has_bias: bool = False
    nnz: int = 0
    col_dtype: str = "int16"

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor of this layer, in canonical order."""
        n, k = self.out_features, self.in_features
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if self.has_perm:
            out["perm"] = ((k,), torch.int32)
        for i, seg in enumerate(self.segments):
            for name, width, _ in plane_layout(seg.bits):
                out[f"seg{i}_{name}"] = ((plane_rows(seg.k, width), n), torch.int32)
            if seg.decoder == "affine":
                out[f"seg{i}_scale"] = ((seg.n_groups, n), torch.float16)
                out[f"seg{i}_zero"] = ((seg.n_groups, n), torch.float16)
            else:
                out[f"seg{i}_lut"] = ((seg.k, 2**seg.bits), torch.float16)
        out["sparse_row_ptr"] = ((n + 1,), torch.int32)
        out["sparse_col"] = ((self.nnz,), COL_DTYPES[self.col_dtype])
        out["sparse_val"] = ((self.nnz,), torch.float16)
        if self.has_bias:
            out["bias"] = ((n,), torch.float16)
        return out

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def bits_per_weight(self) -> dict[str, float]:
        """Bits per weight, counted two ways.

        ``weights``: the dense code bits only (b for one segment; the column-weighted mean for
        mixed segments). ``total``: every stored byte except the bias (codes with their K
        padding, scales, zeros, codebooks, permutation, sparse values, column indices and row
        pointers), over ``in_features * out_features``.
        """
        code_bits = sum(seg.bits * seg.k for seg in self.segments) * self.out_features
        total_bytes = sum(
            math.prod(shape) * dtype.itemsize
            for name, (shape, dtype) in self.tensor_specs().items()
            if name != "bias"
        )
        return {"weights": code_bits / self.numel, "total": 8 * total_bytes / self.numel}

    @property
    def outlier_frac(self) -> float:
        return self.nnz / self.numel

    def describe_bits(self) -> str:
        """Short text like ``3b`` or ``2b:1460+4b:76`` (bits and column counts per segment)."""
        if len(self.segments) == 1:
            return f"{self.segments[0].bits}b"
        return "+".join(f"{s.bits}b:{s.k}" for s in self.segments)

    def to_dict(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.has_bias,
            "perm": self.has_perm,
            "nnz": self.nnz,
            "col_dtype": self.col_dtype,
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: Mapping, layer: str | None = None) -> "LayerSpec":
        """Parse and validate a config entry; errors name the layer."""

        def need(mapping, key, kind, where="layer spec"):
            if key not in mapping:
                raise CheckpointError(f"{where} is missing '{key}'", layer)
            value = mapping[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise CheckpointError(f"{where} '{key}' must be an integer, got {value!r}", layer)
            if kind is bool and not isinstance(value, bool):
                raise CheckpointError(f"{where} '{key}' must be true/false, got {value!r}", layer)
            return value

        if not isinstance(d, Mapping):
            raise CheckpointError(f"layer spec must be a JSON object, got {type(d).__name__}", layer)
        segs = d.get("segments")
        if not isinstance(segs, list) or not segs:
            raise CheckpointError("layer spec needs a non-empty 'segments' list", layer)
        segments = []
        for i, s in enumerate(segs):
            where = f"segment {i}"
            if not isinstance(s, Mapping):
                raise CheckpointError(f"{where} must be a JSON object", layer)
            decoder = s.get("decoder")
            segments.append(
                SegmentSpec(
                    start=need(s, "start", int, where),
                    end=need(s, "end", int, where),
                    bits=need(s, "bits", int, where),
                    decoder=decoder,
                    group_size=need(s, "group_size", int, where) if decoder == "affine" else None,
                )
            )
        spec = cls(
            in_features=need(d, "in_features", int),
            out_features=need(d, "out_features", int),
            segments=tuple(segments),
            has_perm=need(d, "perm", bool),
            has_bias=need(d, "bias", bool),
            nnz=need(d, "nnz", int),
            col_dtype=d.get("col_dtype", "int16"),
        )
        spec.check(layer)
        return spec

    def check(self, layer: str | None = None) -> None:
        """Raise :class:`CheckpointError` unless the spec is self-consistent."""
        n, k = self.out_features, self.in_features
        if n <= 0 or k <= 0:
            raise CheckpointError(f"in_features and out_features must be positive, got K={k}, N={n}", layer)
        expect_start = 0
        for i, seg in enumerate(self.segments):
            if seg.bits not in SUPPORTED_BITS:
                raise CheckpointError(f"segment {i}: bits must be one of {SUPPORTED_BITS}, got {seg.bits}", layer)
            if seg.decoder not in DECODERS:
                raise CheckpointError(f"segment {i}: decoder must be one of {DECODERS}, got {seg.decoder!r}", layer)
            if seg.start != expect_start or seg.end <= seg.start:
                raise CheckpointError(
                    f"segment {i} covers [{seg.start}, {seg.end}); segments must be non-empty, "
                    f"contiguous and start at {expect_start}",
                    layer,
                )
            if seg.decoder == "affine" and (seg.group_size is None or seg.group_size <= 0):
                raise CheckpointError(f"segment {i}: affine group_size must be positive, got {seg.group_size}", layer)
            expect_start = seg.end
        if expect_start != k:
            raise CheckpointError(f"segments cover {expect_start} columns but in_features is {k}", layer)
        if self.col_dtype not in COL_DTYPES:
            raise CheckpointError(f"col_dtype must be one of {tuple(COL_DTYPES)}, got {self.col_dtype!r}", layer)
        if self.col_dtype == "int16" and k > INT16_MAX_K:
            raise CheckpointError(f"int16 column indices cannot address in_features={k} > {INT16_MAX_K}", layer)
        if not 0 <= self.nnz <= n * k:
            raise CheckpointError(f"nnz must be in [0, {n * k}], got {self.nnz}", layer)


# --------------------------------------------------------------------------------------------
# Packed layers: a spec plus its tensors.
# --------------------------------------------------------------------------------------------


@dataclass
class PackedLayer:
    """A quantized linear layer in format v1: a :class:`LayerSpec` and its named tensors.

    Tensor names (see :meth:`LayerSpec.tensor_specs` and docs/format.md) are relative to the
    layer; on disk they are prefixed with ``"<layer name>."``.
    """

    spec: LayerSpec
    tensors: dict[str, torch.Tensor]
    name: str = ""
    # Hot paths that wrap already-validated buffers (QuantLinear, the ops) pass check=False.
    check: InitVar[bool] = True

    def __post_init__(self, check: bool):
        if check:
            validate_layer(self.name, self.spec, self.tensors)

    def segment_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of segment ``i`` without the ``seg{i}_`` prefix (``q2``, ``scale``, ...)."""
        prefix = f"seg{i}_"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def perm(self) -> torch.Tensor | None:
        return self.tensors.get("perm")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors.get("bias")

    def to(self, device) -> "PackedLayer":
        return PackedLayer(self.spec, {k: v.to(device) for k, v in self.tensors.items()}, self.name, check=False)


@dataclass
class SegmentData:
    """Unpacked data of one segment, the input of :func:`build_layer`.

    ``codes``: integer [N, k] in weight orientation, values in [0, 2^bits).
    affine: ``scale`` and ``zero`` [n_groups, N] with w = (q - zero) * scale, group = column // group_size
    (``group_size=None`` means one group per row). lut: ``lut`` [k, 2^bits], w[n, j] = lut[j, q[n, j]].
    """

    bits: int
    codes: torch.Tensor
    decoder: str = "affine"
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    lut: torch.Tensor | None = None
    group_size: int | None = None


def build_layer(
    segments: Iterable[SegmentData],
    *,
    perm: torch.Tensor | None = None,
    sparse: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    name: str = "",
) -> PackedLayer:
    """Pack unpacked codes, decoders, an optional permutation and sparse correction into a layer.

    ``sparse`` is a dense [N, K] tensor (original column order) whose non-zeros become the CSR
    correction (a ``torch.sparse_csr`` tensor is accepted too). Values are stored in fp16.
    """
    segments = list(segments)
    if not segments:
        raise ValueError("a layer needs at least one segment")
    n = segments[0].codes.shape[0]
    specs, tensors, start = [], {}, 0
    for i, seg in enumerate(segments):
        if seg.codes.dim() != 2 or seg.codes.shape[0] != n:
            raise ValueError(f"segment {i}: codes must be [N={n}, k], got {tuple(seg.codes.shape)}")
        k = seg.codes.shape[1]
        group = (seg.group_size or k) if seg.decoder == "affine" else None
        spec = SegmentSpec(start, start + k, seg.bits, seg.decoder, group)
        for pname, plane in pack_codes(seg.codes, seg.bits).items():
            tensors[f"seg{i}_{pname}"] = plane
        if seg.decoder == "affine":
            if seg.scale is None or seg.zero is None:
                raise ValueError(f"segment {i}: affine decoder needs scale and zero")
            tensors[f"seg{i}_scale"] = seg.scale.to(torch.float16).contiguous()
            tensors[f"seg{i}_zero"] = seg.zero.to(torch.float16).contiguous()
        elif seg.decoder == "lut":
            if seg.lut is None:
                raise ValueError(f"segment {i}: lut decoder needs lut")
            tensors[f"seg{i}_lut"] = seg.lut.to(torch.float16).contiguous()
        else:
            raise ValueError(f"segment {i}: unknown decoder {seg.decoder!r}")
        specs.append(spec)
        start += k
    k_total = start
    if perm is not None:
        tensors["perm"] = perm.to(torch.int32).contiguous()
    if sparse is None:
        row_ptr = torch.zeros(n + 1, dtype=torch.int32)
        col = torch.zeros(0, dtype=torch.int64)
        val = torch.zeros(0, dtype=torch.float16)
    else:
        if sparse.layout == torch.sparse_csr:
            sparse = sparse.to_dense()
        if tuple(sparse.shape) != (n, k_total):
            raise ValueError(f"sparse correction must be [N={n}, K={k_total}], got {tuple(sparse.shape)}")
        rows, col = torch.nonzero(sparse, as_tuple=True)  # row-major order, as CSR needs
        val = sparse[rows, col].to(torch.float16)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=sparse.device)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    col_dtype = "int16" if k_total <= INT16_MAX_K else "int32"
    tensors["sparse_row_ptr"] = row_ptr.to(torch.int32).contiguous()
    tensors["sparse_col"] = col.to(COL_DTYPES[col_dtype]).contiguous()
    tensors["sparse_val"] = val.contiguous()
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    spec = LayerSpec(
        in_features=k_total,
        out_features=n,
        segments=tuple(specs),
        has_perm=perm is not None,
        has_bias=bias is not None,
        nnz=int(val.numel()),
        col_dtype=col_dtype,
    )
    return PackedLayer(spec, tensors, name)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_finite(layer: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{bad} value(s) are NaN or Inf", layer, name)


def validate_layer(layer: str, spec: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check every tensor of a layer against its spec and the format's value rules.

    Raises :class:`CheckpointError` naming the layer and tensor on the first problem: a missing
    or unexpected tensor, a wrong dtype or shape, a permutation that is not one, a CSR row_ptr
    that is not monotone or does not end at nnz, a column index outside [0, K), NaN/Inf in
    scales, zeros, codebooks, sparse values or bias.
    """
    spec.check(layer)
    expected = spec.tensor_specs()
    for name in tensors:
        if name not in expected:
            raise CheckpointError("unexpected tensor (not in the layer spec)", layer, name)
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise CheckpointError("missing tensor", layer, name)
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"expected a tensor, got {type(t).__name__}", layer, name)
        if t.dtype != dtype:
            raise CheckpointError(f"expected dtype {dtype}, got {t.dtype}", layer, name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"expected shape {list(shape)} from the layer spec, got {list(t.shape)}", layer, name)
        if t.is_floating_point():
            _check_finite(layer, name, t)

    k, n = spec.in_features, spec.out_features
    if spec.has_perm:
        perm = tensors["perm"].to(torch.int64)
        if int(perm.min()) < 0 or int(perm.max()) >= k or torch.unique(perm).numel() != k:
            raise CheckpointError(f"not a permutation of 0..{k - 1}", layer, "perm")
    row_ptr = tensors["sparse_row_ptr"].to(torch.int64)
    if int(row_ptr[0]) != 0:
        raise CheckpointError(f"must start at 0, got {int(row_ptr[0])}", layer, "sparse_row_ptr")
    if n and bool((row_ptr[1:] < row_ptr[:-1]).any()):
        row = int(torch.nonzero(row_ptr[1:] < row_ptr[:-1])[0])
        raise CheckpointError(f"not monotone (decreases after row {row})", layer, "sparse_row_ptr")
    if int(row_ptr[-1]) != spec.nnz:
        raise CheckpointError(f"must end at nnz={spec.nnz}, ends at {int(row_ptr[-1])}", layer, "sparse_row_ptr")
    col = tensors["sparse_col"].to(torch.int64)
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= k):
        raise CheckpointError(
            f"column indices must lie in [0, {k}), got range [{int(col.min())}, {int(col.max())}]", layer, "sparse_col"
        )


# --------------------------------------------------------------------------------------------
# Slicing: one layer restricted to a range of output rows and/or a set of input columns
# (tensor parallelism: column-parallel shards take rows, row-parallel shards take columns).
# --------------------------------------------------------------------------------------------


def _row_range(rows, n: int, layer: str | None) -> range:
    if rows is None:
        return range(n)
    if isinstance(rows, slice):
        rows = range(*rows.indices(n))
    if not isinstance(rows, range) or rows.step != 1:
        raise ValueError(f"{layer or 'layer'}: rows must be a range with step 1, got {rows!r}")
    if not 0 <= rows.start < rows.stop <= n:
        raise ValueError(f"{layer or 'layer'}: rows {rows!r} must be a non-empty part of [0, {n})")
    return rows


def _col_index(cols, k: int, layer: str | None) -> torch.Tensor | None:
    """None (all columns) or int64 [K'] strictly increasing, inside [0, K)."""
    if cols is None:
        return None
    if isinstance(cols, slice):
        cols = range(*cols.indices(k))
    if isinstance(cols, range):
        if cols.step != 1 or not 0 <= cols.start < cols.stop <= k:
            raise ValueError(f"{layer or 'layer'}: cols {cols!r} must be a non-empty step-1 part of [0, {k})")
        if cols.start == 0 and cols.stop == k:
            return None
        return torch.arange(cols.start, cols.stop, dtype=torch.int64)
    idx = torch.as_tensor(cols, dtype=torch.int64).flatten().cpu()
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= k or bool((idx.diff() <= 0).any()):
        raise ValueError(f"{layer or 'layer'}: cols must be non-empty, strictly increasing and inside [0, {k})")
    return None if idx.numel() == k else idx


def slice_problem(spec: LayerSpec, cols: range | None) -> str | None:
    """Why ``slice_layer(layer, cols=cols)`` cannot be honoured for any layer of this spec, or None.

    Decided from the spec alone (before any tensor exists), for a contiguous range of original
    input columns, as tensor parallelism cuts K: an affine segment with several groups per row
    must be cut on a group boundary, and with an act-order permutation such a segment cannot be
    cut at all (a range of original columns lands on scattered permuted columns, so on partial
    groups). Rows (output features) can always be cut, and so can LUT segments and segments with
    one group per row, at any column: codes are unpacked and repacked, so no 32-column alignment
    is needed.
    """
    if cols is None or (cols.start == 0 and cols.stop == spec.in_features):
        return None
    for i, seg in enumerate(spec.segments):
        if seg.decoder != "affine" or seg.group_size >= seg.k:
            continue
        if spec.has_perm:
            return (f"segment {i} has affine groups of {seg.group_size} columns under an act-order "
                    f"permutation; input columns [{cols.start}, {cols.stop}) fall on partial groups")
        lo, hi = max(cols.start, seg.start) - seg.start, min(cols.stop, seg.end) - seg.start
        if lo < hi and (lo % seg.group_size or (hi % seg.group_size and hi != seg.k)):
            return (f"input columns [{cols.start}, {cols.stop}) cut segment {i}'s affine groups of "
                    f"{seg.group_size} columns (the cut must fall on a multiple of {seg.group_size})")
    return None


def slice_layer(layer: PackedLayer, rows=None, cols=None, bias: bool = True, name: str | None = None) -> PackedLayer:
    """The layer restricted to output rows ``rows`` and input columns ``cols``: a valid format-v1 layer.

    ``rows``: a step-1 ``range`` (or slice) of output features, None for all. ``cols``: a step-1
    ``range``, a slice or a strictly increasing sequence of ORIGINAL input columns, None for all;
    input feature ``i`` of the result is original column ``cols[i]``. ``bias=False`` drops the
    bias (a row-parallel shard other than the first must not add it again).

    ``y_full[:, rows] == slice_layer(l, rows=rows)(x)`` and ``sum over a partition of the columns of
    slice_layer(l, cols=c)(x[:, c]) == y_full`` (with the bias on one part). Planes are cut along N
    when only rows change and are unpacked and repacked when columns change; the permutation,
    LUT rows, scales and zeros of the kept columns are carried; the CSR correction is filtered
    and its column indices re-based. Raises :class:`CheckpointError` (naming the layer and the
    tensor) when the columns cut an affine group.
    """
    spec, t = layer.spec, layer.tensors
    lname = layer.name or None
    n, k = spec.out_features, spec.in_features
    r = _row_range(rows, n, lname)
    c = _col_index(cols, k, lname)
    r0, r1 = r.start, r.stop
    out: dict[str, torch.Tensor] = {}
    segments: list[SegmentSpec] = []
    perm = t["perm"].to(torch.int64) if spec.has_perm else None

    if c is None:
        if perm is not None:
            out["perm"] = t["perm"].clone()
        for i, seg in enumerate(spec.segments):
            for pname, _, _ in plane_layout(seg.bits):
                out[f"seg{i}_{pname}"] = t[f"seg{i}_{pname}"][:, r0:r1].contiguous()
            if seg.decoder == "affine":
                out[f"seg{i}_scale"] = t[f"seg{i}_scale"][:, r0:r1].contiguous()
                out[f"seg{i}_zero"] = t[f"seg{i}_zero"][:, r0:r1].contiguous()
            else:
                out[f"seg{i}_lut"] = t[f"seg{i}_lut"].clone()
            segments.append(seg)
        new_k = k
    else:
        device = t["sparse_row_ptr"].device
        c = c.to(device)
        new_index = torch.full((k,), -1, dtype=torch.int64, device=device)
        new_index[c] = torch.arange(c.numel(), device=device)
        orig_of_pos = perm if perm is not None else torch.arange(k, device=device)
        sel_pos = torch.nonzero(new_index[orig_of_pos] >= 0).flatten()  # permuted positions, ascending
        if perm is not None:
            out["perm"] = new_index[orig_of_pos[sel_pos]].to(torch.int32)
        start = 0
        for i, seg in enumerate(spec.segments):
            local = sel_pos[(sel_pos >= seg.start) & (sel_pos < seg.end)] - seg.start
            if local.numel() == 0:
                continue
            j = len(segments)
            planes = {pname: t[f"seg{i}_{pname}"] for pname, _, _ in plane_layout(seg.bits)}
            codes = unpack_codes(planes, seg.bits, seg.k)[r0:r1][:, local]
            for pname, plane in pack_codes(codes, seg.bits).items():
                out[f"seg{j}_{pname}"] = plane
            kk = local.numel()
            if seg.decoder == "affine":
                g = seg.group_size
                if g >= seg.k:
                    group, new_g = torch.zeros(1, dtype=torch.int64, device=device), kk
                else:
                    groups, counts = torch.unique(local // g, return_counts=True)
                    full = torch.clamp(seg.k - groups * g, max=g)
                    if bool((counts != full).any()):
                        bad = int(groups[counts != full][0])
                        raise CheckpointError(
                            f"the selected input columns cut affine group {bad} ({g} columns) of segment {i}; "
                            "a layer with groups can only be cut on group boundaries", lname, f"seg{i}_scale")
                    group, new_g = groups, g
                out[f"seg{j}_scale"] = t[f"seg{i}_scale"][group][:, r0:r1].contiguous()
                out[f"seg{j}_zero"] = t[f"seg{i}_zero"][group][:, r0:r1].contiguous()
                segments.append(SegmentSpec(start, start + kk, seg.bits, "affine", new_g))
            else:
                out[f"seg{j}_lut"] = t[f"seg{i}_lut"][local].contiguous()
                segments.append(SegmentSpec(start, start + kk, seg.bits, "lut"))
            start += kk
        new_k = c.numel()

    # CSR: rows first (a contiguous block of entries), then the columns (filter, re-base, recount)
    row_ptr = t["sparse_row_ptr"].to(torch.int64)
    lo, hi = int(row_ptr[r0]), int(row_ptr[r1])
    rp = row_ptr[r0 : r1 + 1] - lo
    col = t["sparse_col"][lo:hi].to(torch.int64)
    val = t["sparse_val"][lo:hi]
    if c is not None:
        keep = new_index[col] >= 0
        entry_row = torch.repeat_interleave(torch.arange(len(r), device=rp.device), rp.diff())
        counts = torch.bincount(entry_row[keep], minlength=len(r))
        rp = torch.cat([rp.new_zeros(1), torch.cumsum(counts, 0)])
        col, val = new_index[col[keep]], val[keep]
    col_dtype = "int16" if new_k <= INT16_MAX_K else "int32"
    out["sparse_row_ptr"] = rp.to(torch.int32).contiguous()
    out["sparse_col"] = col.to(COL_DTYPES[col_dtype]).contiguous()
    out["sparse_val"] = val.contiguous()
    keep_bias = spec.has_bias and bias
    if keep_bias:
        out["bias"] = t["bias"][r0:r1].contiguous()
    new_spec = LayerSpec(
        in_features=new_k,
        out_features=len(r),
        segments=tuple(segments),
        has_perm=spec.has_perm,
        has_bias=keep_bias,
        nnz=int(val.numel()),
        col_dtype=col_dtype,
    )
    return PackedLayer(new_spec, out, layer.name if name is None else name)


# --------------------------------------------------------------------------------------------
# quantization_config block and safetensors I/O
# --------------------------------------------------------------------------------------------


def make_quantization_config(
    layers: Mapping[str, PackedLayer | LayerSpec],
    method: str,
    method_args: Mapping | None = None,
    modules_to_not_convert: Iterable[str] = ("lm_head",),
) -> dict:
    """The ``quantization_config`` block of config.json for a set of quantized layers."""
    specs = {name: (l.spec if isinstance(l, PackedLayer) else l) for name, l in layers.items()}
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_args": dict(method_args or {}),
        "modules_to_not_convert": list(modules_to_not_convert),
        "layers": {name: spec.to_dict() for name, spec in specs.items()},
    }


def parse_quantization_config(config: Mapping) -> dict[str, LayerSpec]:
    """Validate a ``quantization_config`` block and return its per-layer specs."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"quantization_config must be a JSON object, got {type(config).__name__}")
    qm = config.get("quant_method")
    if qm != QUANT_METHOD:
        raise CheckpointError(f"quant_method is {qm!r}, expected {QUANT_METHOD!r}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CheckpointError(
                f"format_version {version} is newer than this tacq_kernels reads ({FORMAT_VERSION}); "
                "upgrade tacq_kernels"
            )
        raise CheckpointError(f"unknown format_version {version!r}; this tacq_kernels reads version {FORMAT_VERSION}")
    if "layers" not in config or config["layers"] is None:
        raise CheckpointError("quantization_config has no 'layers' table (one entry per quantized linear); "
                              "without it no layer could be loaded")
    layers = config["layers"]
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"quantization_config 'layers' must be a JSON object, got {type(layers).__name__}")
    if not layers:
        raise CheckpointError("quantization_config 'layers' table is empty: the checkpoint names no quantized layer")
    return {name: LayerSpec.from_dict(d, name) for name, d in layers.items()}


def layer_state_dict(layers: Mapping[str, PackedLayer]) -> dict[str, torch.Tensor]:
    """Flatten layers into ``{"<layer>.<tensor>": tensor}`` (the on-disk names)."""
    return {f"{name}.{t}": v for name, layer in layers.items() for t, v in layer.tensors.items()}


def split_layer_state_dict(
    state: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]
) -> tuple[dict[str, PackedLayer], dict[str, torch.Tensor]]:
    """Group on-disk tensors into validated layers; return (layers, the other tensors).

    Every layer is validated before anything is returned, so a bad file loads nothing.
    """
    rest = dict(state)
    layers = {}
    for name, spec in specs.items():
        tensors = {}
        for tname in spec.tensor_specs():
            key = f"{name}.{tname}"
            if key not in rest:
                raise CheckpointError("missing tensor", name, tname)
            tensors[tname] = rest.pop(key)
        layers[name] = PackedLayer(spec, tensors, name)
    for key in rest:
        owner = key.rpartition(".")[0]
        if owner in specs:
            raise CheckpointError("unexpected tensor (not in the layer spec)", owner, key.rpartition(".")[2])
    return layers, rest


def safetensors_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory (``model.safetensors`` or its shards)."""
    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read shard index {index}: {e}") from e
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file, or of a (possibly sharded) checkpoint directory.

    Unreadable or truncated files raise :class:`CheckpointError` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        out = {}
        for fname in safetensors_files(path):
            out.update(read_safetensors(fname))
        return out
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e


def save_layers(
    path: str | os.PathLike,
    layers: Mapping[str, PackedLayer],
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write layers (and any other tensors, e.g. embeddings and norms) to one safetensors file."""
    from safetensors.torch import save_file

    state = layer_state_dict(layers)
    for k, v in (extra_tensors or {}).items():
        if k in state:
            raise ValueError(f"tensor name {k!r} is used by a quantized layer")
        state[k] = v
    meta = {"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION)}
    meta.update(metadata or {})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.fspath(path), metadata=meta)


def load_layers(
    path: str | os.PathLike, quantization_config: Mapping
) -> tuple[dict[str, PackedLayer], dict[str, torch.Tensor]]:
    """Read and validate all quantized layers of a checkpoint; return (layers, other tensors)."""
    specs = parse_quantization_config(quantization_config)
    return split_layer_state_dict(read_safetensors(path), specs)
