"""The reference math against a naive per-element loop written straight from docs/format.md."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tacq_kernels import QuantLinear, reference
from tacq_kernels.testing import random_layer


def naive_weight(layer):
    """W_effective[n, k] by reading single bits out of the planes, one element at a time."""
    spec, t = layer.spec, layer.tensors
    n_out, k_in = spec.out_features, spec.in_features
    perm = t["perm"].tolist() if spec.has_perm else list(range(k_in))
    w = [[0.0] * k_in for _ in range(n_out)]
    for i, seg in enumerate(spec.segments):
        for j in range(seg.start, seg.end):
            jj = j - seg.start
            for n in range(n_out):
                if seg.bits == 4:
                    q = (int(t[f"seg{i}_q4"][jj // 8, n]) >> (4 * (jj % 8))) & 15
                else:
                    q = (int(t[f"seg{i}_q2"][jj // 16, n]) >> (2 * (jj % 16))) & 3
                    if seg.bits == 3:
                        q |= ((int(t[f"seg{i}_q1"][jj // 32, n]) >> (jj % 32)) & 1) << 2
                if seg.decoder == "affine":
                    grp = jj // seg.group_size
                    v = (q - float(t[f"seg{i}_zero"][grp, n])) * float(t[f"seg{i}_scale"][grp, n])
                else:
                    v = float(t[f"seg{i}_lut"][jj, q])
                w[n][perm[j]] = v
    row_ptr = t["sparse_row_ptr"].tolist()
    for n in range(n_out):
        for p in range(row_ptr[n], row_ptr[n + 1]):
            w[n][int(t["sparse_col"][p])] += float(t["sparse_val"][p])
    return torch.tensor(w)


@given(
    n=st.integers(1, 6),
    k=st.integers(2, 70),
    bits=st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=2),
    decoder=st.sampled_from(["affine", "lut"]),
    group=st.sampled_from([None, 8, 13, 32]),
    perm=st.booleans(),
    outliers=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 1000),
)
def test_dequantize_matches_naive_loop(n, k, bits, decoder, group, perm, outliers, seed):
    layer = random_layer(n, k, bits=bits, decoder=decoder, group_size=group, outlier_frac=outliers, perm=perm, seed=seed)
    expect = naive_weight(layer)
    assert torch.allclose(reference.dequantize(layer), expect, rtol=0, atol=1e-6)


def test_mixed_affine_and_lut_segments_with_perm():
    layer = random_layer(5, 77, bits=[2, 4, 3], decoder=["affine", "lut", "affine"], group_size=16, perm=True,
                         outlier_frac=0.03, seed=3)
    assert [s.decoder for s in layer.spec.segments] == ["affine", "lut", "affine"]
    assert torch.allclose(reference.dequantize(layer), naive_weight(layer), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3,), (2, 4), (1, 1, 5)])
def test_quantlinear_forward_equals_dequantized_matmul(dtype, lead):
    layer = random_layer(24, 40, bits=3, group_size=16, outlier_frac=0.02, perm=True, bias=True, seed=1)
    torch.manual_seed(0)
    x = torch.randn(*lead, 40).to(dtype)
    expect = (x.float() @ reference.dequantize(layer).t() + layer.bias.float()).to(dtype)
    for cache in (False, True):
        m = QuantLinear.from_packed(layer, cache_dequantized=cache)
        y = m(x)
        assert y.dtype == dtype and y.shape == (*lead, 24)
        assert torch.equal(y, expect)


def test_quantlinear_rejects_wrong_in_features():
    m = QuantLinear.from_packed(random_layer(4, 8, name="blk.0.q"))
    with pytest.raises(ValueError, match="blk.0.q: input has 9 features, expected 8"):
        m(torch.randn(2, 9))
