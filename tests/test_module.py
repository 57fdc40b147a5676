import torch

from tacq_kernels import QuantLinear, reference
from tacq_kernels.format import LayerSpec
from tacq_kernels.testing import random_layer


def test_buffers_state_dict_and_dtype_moves():
    layer = random_layer(8, 40, bits=[2, 4], decoder=["affine", "lut"], outlier_frac=0.05, perm=True, bias=True)
    m = QuantLinear.from_packed(layer)
    sd = m.state_dict()
    assert set(sd) == set(layer.tensors)
    for name, t in layer.tensors.items():
        assert torch.equal(sd[name], t) and sd[name].dtype == t.dtype
    m.half()
    m.to(torch.bfloat16)
    for name, t in layer.tensors.items():
        assert getattr(m, name).dtype == t.dtype, name
        assert torch.equal(getattr(m, name), t)
    # A module built from the spec alone takes the state dict and computes the same thing.
    m2 = QuantLinear(LayerSpec.from_dict(layer.spec.to_dict()))
    m2.load_state_dict(sd)
    x = torch.randn(3, 40)
    assert torch.equal(m2(x), reference.linear(x, layer))


def test_cache_dropped_on_reload():
    a = random_layer(6, 32, seed=1)
    b = random_layer(6, 32, seed=2)
    m = QuantLinear.from_packed(a)
    x = torch.randn(2, 32)
    assert torch.equal(m(x), reference.linear(x, a))
    m.load_state_dict(QuantLinear.from_packed(b).state_dict())
    assert torch.equal(m(x), reference.linear(x, b))


def test_extra_repr_shows_bits_segments_nnz():
    layer = random_layer(16, 64, bits=[2, 4], outlier_frac=0.01, name="m.q_proj")
    text = repr(QuantLinear.from_packed(layer))
    assert "bits=2b:32+4b:32" in text and "segments=2" in text and f"nnz={layer.spec.nnz}" in text


def test_bits_per_weight_both_ways():
    # 3-bit, per-row affine, K=64, N=16, 10 outliers with int16 columns.
    layer = random_layer(16, 64, bits=3, outlier_frac=10 / (16 * 64))
    bpw = layer.spec.bits_per_weight()
    assert bpw["weights"] == 3.0
    numel = 16 * 64
    expect_bytes = (64 * 3 // 8) * 16 + 2 * 2 * 16 + 4 * 17 + (2 + 2) * 10
    assert abs(bpw["total"] - 8 * expect_bytes / numel) < 1e-12
