"""slice_layer: a format-v1 layer restricted to output rows and/or input columns (tensor parallelism).

Properties, for random layers of every kind (1-3 segments of 2/3/4 bits, affine per row or in
groups, LUT, act-order permutation, CSR outliers, bias): the row slices of a partition stacked,
and the column slices of a partition summed (bias on one part), give the unsliced layer's
weight and output; every slice is a valid format-v1 layer (the constructor validates it).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tacq_kernels import CheckpointError, slice_layer, slice_problem
from tacq_kernels.reference import dequantize, linear
from tacq_kernels.testing import random_layer


@st.composite
def layers(draw):
    nseg = draw(st.integers(1, 3))
    bits = draw(st.lists(st.sampled_from([2, 3, 4]), min_size=nseg, max_size=nseg))
    decoder = draw(st.lists(st.sampled_from(["affine", "lut"]), min_size=nseg, max_size=nseg))
    perm = draw(st.booleans())
    # groups smaller than a segment only without a permutation (with one, K cannot be cut: see below)
    group = None if perm else draw(st.sampled_from([None, 8, 16]))
    n = draw(st.integers(1, 24))
    unit = group or 1
    if group:  # segments of whole groups, so that every group boundary is a possible cut
        k = group * nseg * draw(st.integers(1, 4))
    else:
        k = draw(st.integers(max(nseg, 2), 90))
    layer = random_layer(n, k, bits=bits, decoder=decoder, group_size=group, perm=perm,
                         outlier_frac=draw(st.sampled_from([0.0, 0.05, 0.3])), bias=draw(st.booleans()),
                         seed=draw(st.integers(0, 2**16)), name="t")
    return layer, unit


def cuts(draw, total, unit, max_parts=4):
    """Sorted cut points 0 = c0 < c1 < ... = total on multiples of unit."""
    inner = draw(st.sets(st.integers(1, max(1, total // unit - 1)), max_size=max_parts - 1))
    pts = sorted({0, total, *(i * unit for i in inner if 0 < i * unit < total)})
    return list(zip(pts[:-1], pts[1:]))


@given(layers(), st.data())
def test_row_slices_stack_to_the_layer(lu, data):
    layer, _ = lu
    n, k = layer.spec.out_features, layer.spec.in_features
    parts = cuts(data.draw, n, 1)
    x = torch.randn(3, k)
    full_w, full_y = dequantize(layer), linear(x, layer)
    ws, ys = [], []
    for a, b in parts:
        s = slice_layer(layer, rows=range(a, b))
        assert s.spec.out_features == b - a and s.spec.in_features == k
        ws.append(dequantize(s))
        ys.append(linear(x, s))
    assert torch.equal(torch.cat(ws, 0), full_w)
    torch.testing.assert_close(torch.cat(ys, 1), full_y, rtol=1e-5, atol=1e-6)


@given(layers(), st.data())
def test_column_slices_sum_to_the_layer(lu, data):
    layer, unit = lu
    n, k = layer.spec.out_features, layer.spec.in_features
    parts = cuts(data.draw, k, unit)
    x = torch.randn(3, k)
    full_w, full_y = dequantize(layer), linear(x, layer)
    y = torch.zeros_like(full_y)
    nnz = 0
    for i, (a, b) in enumerate(parts):
        assert slice_problem(layer.spec, range(a, b)) is None
        s = slice_layer(layer, cols=range(a, b), bias=(i == 0))
        assert s.spec.in_features == b - a and s.spec.out_features == n
        assert s.spec.has_bias == (layer.spec.has_bias and i == 0)
        assert torch.equal(dequantize(s), full_w[:, a:b])  # exact: same codes, same decoders
        y += linear(x[:, a:b], s)
        nnz += s.spec.nnz
    assert nnz == layer.spec.nnz  # every outlier lands in exactly one part
    torch.testing.assert_close(y, full_y, rtol=1e-5, atol=1e-5)


@given(layers(), st.data())
def test_rows_and_scattered_columns_together(lu, data):
    """A block of rows and any increasing set of columns (allowed when no group is cut)."""
    layer, unit = lu
    n, k = layer.spec.out_features, layer.spec.in_features
    (a, b) = data.draw(st.sampled_from(cuts(data.draw, n, 1)))
    groups = data.draw(st.sets(st.integers(0, k // unit - 1), min_size=1))
    cols = sorted(c for g in groups for c in range(g * unit, (g + 1) * unit))
    s = slice_layer(layer, rows=range(a, b), cols=cols)
    assert torch.equal(dequantize(s), dequantize(layer)[a:b][:, cols])
    x = torch.randn(2, len(cols))
    xf = torch.zeros(2, k)
    xf[:, cols] = x
    torch.testing.assert_close(linear(x, s), linear(xf, layer)[:, a:b], rtol=1e-5, atol=1e-5)


def test_segments_that_lose_all_columns_are_dropped():
    layer = random_layer(8, 64, bits=[2, 4], decoder=["lut", "affine"], outlier_frac=0.1)
    s = slice_layer(layer, cols=range(0, 20))  # inside segment 0 (columns 0..31)
    assert len(s.spec.segments) == 1 and s.spec.segments[0].bits == 2
    s = slice_layer(layer, cols=range(40, 64))
    assert [(g.bits, g.k, g.group_size) for g in s.spec.segments] == [(4, 24, 24)]  # per-row group follows k
    assert torch.equal(dequantize(s), dequantize(layer)[:, 40:64])


def test_a_cut_inside_a_group_names_the_layer_and_tensor():
    layer = random_layer(4, 64, bits=3, group_size=32, name="model.layers.0.mlp.down_proj")
    assert "multiple of 32" in slice_problem(layer.spec, range(0, 16))
    with pytest.raises(CheckpointError, match=r"down_proj.*seg0_scale.*cut affine group 0"):
        slice_layer(layer, cols=range(0, 16))
    assert slice_problem(layer.spec, range(32, 64)) is None
    assert slice_problem(layer.spec, range(0, 64)) is None


def test_act_order_with_groups_cannot_be_cut_along_k():
    layer = random_layer(4, 64, bits=3, group_size=16, perm=True)
    assert "act-order" in slice_problem(layer.spec, range(0, 32))
    with pytest.raises(CheckpointError, match="cut affine group"):
        slice_layer(layer, cols=range(0, 32))
    # rows are always fine
    s = slice_layer(layer, rows=range(1, 3))
    assert torch.equal(dequantize(s), dequantize(layer)[1:3])


def test_bad_ranges_are_refused():
    layer = random_layer(4, 32)
    for kwargs in (dict(rows=range(0, 5)), dict(rows=range(2, 2)), dict(rows=range(0, 4, 2)),
                   dict(cols=range(0, 33)), dict(cols=[3, 1]), dict(cols=[])):
        with pytest.raises(ValueError):
            slice_layer(layer, **kwargs)
