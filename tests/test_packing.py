import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tacq_kernels.packing import (
    PLANES,
    pack_codes,
    pack_plane,
    padded_k,
    plane_rows,
    unpack_codes,
    unpack_plane,
)


@given(width=st.sampled_from([1, 2, 4]), k=st.integers(1, 200), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_plane_roundtrip_and_bit_positions(width, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**width, (k, n), generator=g)
    plane = pack_plane(values, width)
    assert plane.dtype == torch.int32
    assert plane.shape == (plane_rows(k, width), n)
    assert torch.equal(unpack_plane(plane, width, k), values)
    # The documented layout: code k of column c is bits [i*w, (i+1)*w) of word k // (32/w).
    per = 32 // width
    words = plane.to(torch.int64) & 0xFFFFFFFF
    for kk in {0, k // 2, k - 1}:
        for c in {0, n - 1}:
            i = kk % per
            got = (int(words[kk // per, c]) >> (i * width)) & (2**width - 1)
            assert got == int(values[kk, c])


@given(bits=st.sampled_from([2, 3, 4]), k=st.integers(1, 300), n=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_codes_roundtrip_every_bitwidth(bits, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    planes = pack_codes(codes, bits)
    assert set(planes) == {name for name, _, _ in PLANES[bits]}
    for name, width, _ in PLANES[bits]:
        assert planes[name].shape == (padded_k(k) * width // 32, n)
    assert torch.equal(unpack_codes(planes, bits, k), codes)


def test_three_bit_is_two_plus_one_plane():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    planes = pack_codes(codes, 3)
    low = unpack_plane(planes["q2"], 2, 8)[:, 0]
    high = unpack_plane(planes["q1"], 1, 8)[:, 0]
    assert low.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert high.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_high_bit_words_survive_int32():
    codes = torch.full((1, 32), 3)  # every bit of the 2-bit plane set: 0xFFFFFFFF == -1 as int32
    plane = pack_codes(codes, 2)["q2"]
    assert plane.tolist() == [[-1], [-1]]
    assert torch.equal(unpack_codes({"q2": plane}, 2, 32), codes)


@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_codes_rejected(bad):
    codes = torch.zeros(2, 5, dtype=torch.int64)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match=r"2-bit codes must lie in \[0, 3\]"):
        pack_codes(codes, 2)


def test_unsupported_bits_rejected():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.zeros(2, 5, dtype=torch.int64), 5)
