"""The Triton kernels (gemv, gemm, prefill) against the fp32 reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1); with CUDA the same tests run on the GPU. Shapes are
small but odd (K = 576 and 1536 as in SmolLM2, N not a multiple of any tile) so that every mask
and split is exercised while the whole file stays within a few minutes on two CPU cores; the
real-size shapes are in test_kernels_gpu.py.

Every call writes into an output buffer filled with NaN first, so an element a kernel forgot to
write fails the comparison.

Tolerances are relative errors ||y - y_ref|| / ||y_ref||, y_ref = x.float() @ W_eff^T + bias in
fp32 (tacq_kernels.reference.dequantize):
* fp32 activations: 1e-5. Only accumulation order differs (fp32, K <= 11008 terms: ~1e-6).
* fp16: 1e-3. Rounding the output to fp16 costs 2^-11/sqrt(12) ~ 1.4e-4 relative (rms) and
  paths that round the weight to fp16 (LUT and per-row-group tl.dot, prefill) add about as
  much; measured 2-3e-4. 1e-3 leaves room for accumulation order and an unlucky draw, and is
  far below what a wrong code, scale, row or outlier produces (> 1e-2).
* bf16: 1e-2. The same argument with 2^-8: ~1.1e-3 for the output and as much for bf16
  weights in the tl.dot and prefill paths. Triton's interpreter also truncates fp32 -> bf16
  instead of rounding to nearest (its cast passes no rounding mode), which doubles the output
  error on the CPU: measured 3.4e-3 there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tacq_kernels import kernels, reference
from tacq_kernels.format import PackedLayer
from tacq_kernels.kernels import gemm, gemv, prefill
from tacq_kernels.kernels.gemv import uses_xprep
from tacq_kernels.testing import random_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def reference_fp32(x: torch.Tensor, layer) -> torch.Tensor:
    y = x.float() @ reference.dequantize(layer).t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    return float((y.float() - y_ref).norm() / y_ref.norm())


def check(run, x, layer, **kwargs):
    """Run a launcher into a NaN-poisoned buffer and compare with the fp32 reference."""
    out = torch.full((x.shape[0], layer.spec.out_features), float("nan"), dtype=x.dtype, device=x.device)
    result = run(x, layer, out=out, **kwargs)
    assert result is out
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    err = rel_err(out, reference_fp32(x, layer))
    assert err < TOL[x.dtype], f"relative error {err:.2e} >= {TOL[x.dtype]:.0e}"
    return out


def with_csr(layer, rows, cols, vals):
    """The same dense part with the CSR correction replaced by entries (rows, cols, vals); rows
    must be sorted. Repeated (row, col) pairs are allowed by the format (S is additive)."""
    n = layer.spec.out_features
    rows = torch.as_tensor(rows, dtype=torch.int64)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    t = dict(layer.tensors)
    t["sparse_row_ptr"] = row_ptr.to(torch.int32).to(DEVICE)
    t["sparse_col"] = torch.as_tensor(cols).to(torch.int16).to(DEVICE)
    t["sparse_val"] = torch.as_tensor(vals, dtype=torch.float32).to(torch.float16).to(DEVICE)
    return PackedLayer(dataclasses.replace(layer.spec, nnz=int(rows.numel())), t)


def make(n, k, bits=3, decoder="affine", m=1, dtype=torch.float16, seed=0, **layer_kwargs):
    layer = random_layer(n, k, bits=bits, decoder=decoder, seed=seed, device=DEVICE, **layer_kwargs)
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
    return x, layer


# Cases shared by the paths: (bits, decoder, group_size, perm, outlier_frac, bias). Mixed
# segments are CLAQ's adaptive precision (2-bit + 4-bit LUT) and an affine/LUT mix.
CASES = {
    "2b-affine-row": (2, "affine", None, False, 0.0, False),
    "3b-affine-row-perm-outliers-bias": (3, "affine", None, True, 0.01, True),
    "4b-affine-g64-outliers": (4, "affine", 64, False, 0.01, False),
    "3b-affine-g128-perm": (3, "affine", 128, True, 0.01, True),
    "2b-affine-g48": (2, "affine", 48, False, 0.01, False),  # group not a multiple of any BLOCK_K
    "2b-lut-outliers": (2, "lut", None, False, 0.01, True),
    "3b-lut-perm": (3, "lut", None, True, 0.0, False),
    "4b-lut-perm-outliers": (4, "lut", None, True, 0.01, False),
    "claq-2b+4b-lut-perm-outliers": ([2, 4], "lut", None, True, 0.01, False),
    "3b-affine+2b-lut-bias": ([3, 2], ["affine", "lut"], None, False, 0.01, True),
}


def case_layer(name, n, k, m, dtype, seed=0):
    bits, decoder, group, perm, frac, bias = CASES[name]
    return make(n, k, bits, decoder, m=m, dtype=dtype, seed=seed, group_size=group, perm=perm,
                outlier_frac=frac, bias=bias)


@pytest.mark.parametrize(
    "kernel,case,m,n,dtype",
    [
        (gemv, "3b-affine-row-perm-outliers-bias", 1, 136, torch.bfloat16),
        (gemv, "4b-lut-perm-outliers", 1, 136, torch.bfloat16),
        (gemv, "claq-2b+4b-lut-perm-outliers", 7, 136, torch.bfloat16),
        (gemv, "3b-affine-g128-perm", 7, 136, torch.float32),
        (gemv, "2b-lut-outliers", 2, 136, torch.float32),
        (gemm, "3b-affine-row-perm-outliers-bias", 33, 100, torch.bfloat16),
        (gemm, "claq-2b+4b-lut-perm-outliers", 20, 100, torch.bfloat16),
        (gemm, "4b-affine-g64-outliers", 17, 100, torch.float32),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v).replace("torch.", ""),
)
def test_kernel_dtypes(kernel, case, m, n, dtype):
    """bf16 and fp32 activations (the case tests run fp16) through both Triton kernels."""
    x, layer = case_layer(case, n, 576, m, dtype, seed=3 if kernel is gemv else 12)
    check(kernel, x, layer)


# ----------------------------------------------------------------------------------------------
# Small batch: split-K GEMV
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_cases(case, m):
    x, layer = case_layer(case, 200, 576, m, torch.float16, seed=m)
    check(gemv, x, layer)


@pytest.mark.parametrize(
    "config",
    [
        # 5 N tiles, the last one holding 8 columns; 3 splits of 9 chunks; T_UNROLL 2 vs full
        dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2, T_UNROLL=2),
        # one split, one program per N tile: the kernel writes the output directly (no reduction)
        dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2),
        # more splits than some rows have outliers, splits longer than the K of a segment
        dict(BLOCK_N=256, BLOCK_K=32, SPLIT_K=8, num_warps=4, num_stages=2),
    ],
    ids=["split3", "direct", "split8"],
)
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_splits_and_edges(config, m):
    x, layer = make(136, 576, bits=[3, 4], decoder=["affine", "lut"], m=m, group_size=64, perm=True,
                    outlier_frac=0.02, bias=True, seed=5)
    check(gemv, x, layer, config=config)


_SPLIT3 = dict(BLOCK_N=128, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2)
_SPLIT2_K128 = dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize(
    "bits,decoder,group,perm,dtype,k,config",
    [
        (2, "affine", None, True, torch.float32, 600, None),
        (3, "affine", None, False, torch.float32, 600, _SPLIT3),
        (4, "affine", None, True, torch.float32, 600, None),
        (2, "affine", 128, True, torch.float32, 640, _SPLIT2_K128),
        (3, "affine", 64, True, torch.float16, 600, None),
        (4, "affine", 128, False, torch.bfloat16, 640, None),
        ([2, 3], "affine", None, True, torch.float32, 1536, None),  # segments at K offsets 0 and 768
        (2, "lut", None, True, torch.float32, 600, None),
        ([3, 2], ["affine", "lut"], None, False, torch.float16, 1536, _SPLIT3),
    ],
    ids=["2b-perm-f32", "3b-split3-f32", "4b-perm-f32", "2b-g128-split2-f32", "3b-g64-perm-f16", "4b-g128-bf16",
         "2b+3b-perm-f32", "2b-lut-perm-f32", "3b+2b-lut-split3-f16"],
)
def test_gemv1_xprep(bits, decoder, group, perm, dtype, k, config):
    """M = 1 affine segments and 2-bit tables run the x pre-pass and the in-place subnormal
    decode (gemv._gemv1_tile).

    fp32 x at the 1e-5 tolerance shows the decode is exact: a field masked in place read as fp32
    is q * 2^(e - 149) and its product with x * 2^(XP_S - e) rounds like x * q (for tables: like
    x times the multilinear coefficients). K = 600 and 640 leave a partial last chunk (rows past K
    read x = 0 from the pre-pass); N = 136 a ragged tile; x is scaled by 300 to show the
    pre-scaling does not overflow for large activations.
    """
    layer = random_layer(136, k, bits=bits, decoder=decoder, group_size=group, perm=perm, outlier_frac=0.01,
                         bias=True, seed=41, device=DEVICE)
    for seg in layer.spec.segments:
        assert uses_xprep(1, seg, (config or {}).get("BLOCK_K", 64))
    g = torch.Generator().manual_seed(42)
    x = (300 * torch.randn(1, k, generator=g)).to(device=DEVICE, dtype=dtype)
    check(gemv, x, layer, config=config)


def test_gemv_long_k():
    # K = 11008 (Llama-2-7B down_proj): long split-K runs and int16 column indices near their
    # range; a narrow N keeps the interpreter quick.
    x, layer = make(40, 11008, bits=3, m=1, outlier_frac=0.005, perm=True, seed=7)
    check(gemv, x, layer)


def test_gemv_smollm2_up_proj():
    # K = 576, N = 1536 (SmolLM2-135M up_proj) with TACQ's outlier rate and the default config
    x, layer = make(1536, 576, bits=2, m=1, outlier_frac=0.0035, seed=8)
    check(gemv, x, layer)


def test_gemv_rows_without_and_with_many_outliers():
    # One CSR row with 83 entries next to empty rows: the sparse loop runs to the longest row of
    # the tile and is shared by the 4 splits.
    x, layer = make(70, 576, bits=2, m=3, seed=9)
    rows = [5] * 83 + [66]
    cols = list(range(0, 576, 7)) + [3]
    layer = with_csr(layer, rows, cols, [0.05] * 83 + [-0.2])
    check(gemv, x, layer, config=dict(BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=2))


# ----------------------------------------------------------------------------------------------
# Medium batch: dequantize + tl.dot
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_gemm_cases(case):
    x, layer = case_layer(case, 136, 576, 16, torch.float16, seed=11)
    check(gemm, x, layer)


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2),
    ],
    ids=["split3", "direct"],
)
def test_gemm_splits_and_edges(config):
    # M = 33: three M tiles of 16, the last holding one row; N = 100: a ragged last N tile
    x, layer = make(100, 576, bits=[3, 2], decoder=["affine", "lut"], m=33, group_size=64, perm=True,
                    outlier_frac=0.02, bias=True, seed=13)
    check(gemm, x, layer, config=config)


def test_gemm_k1536():
    # K = 1536 (SmolLM2 down_proj), one group per row, CLAQ-like outliers
    x, layer = make(64, 1536, bits=3, m=24, outlier_frac=0.01, perm=True, bias=True, seed=14)
    check(gemm, x, layer)


# ----------------------------------------------------------------------------------------------
# Large batch: dequantize (CSR folded in) + torch.matmul
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_is_exact_in_fp32(case):
    # fp32 decode does the same arithmetic as the reference: bit-for-bit equal.
    _, layer = case_layer(case, 100, 576, 1, torch.float32, seed=21)
    assert torch.equal(kernels.dequantize(layer, torch.float32), reference.dequantize(layer))


@pytest.mark.parametrize(
    "case,dtype",
    [
        ("3b-affine-row-perm-outliers-bias", torch.float16),
        ("claq-2b+4b-lut-perm-outliers", torch.bfloat16),
        ("4b-affine-g64-outliers", torch.float32),
        ("2b-lut-outliers", torch.float16),
    ],
)
def test_prefill(case, dtype):
    x, layer = case_layer(case, 1536, 576, 300, dtype, seed=22)
    check(prefill, x, layer)


def test_duplicate_csr_entries_add_up():
    # The prefill fold adds entries one after the other; the fused paths just sum them.
    x, layer = make(64, 576, bits=2, m=40, seed=23)
    layer = with_csr(layer, [3, 3, 60], [10, 10, 575], [0.5, 0.25, -1.0])
    check(prefill, x, layer)
    check(gemm, x, layer)
    check(gemv, x[:2], layer)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_path_for_thresholds():
    assert [kernels.path_for(m, torch.float16) for m in (1, 8, 9, 16, 1024, 1025)] == [
        "gemv", "gemv", "gemm", "gemm", "gemm", "prefill"
    ]
    assert kernels.path_for(5, torch.float32) == "gemv"
    assert kernels.path_for(64, torch.float32) == "prefill"


@pytest.mark.parametrize("m", [0, 2, 12])
def test_linear_dispatches_and_matches(m):
    x, layer = make(72, 576, bits=[2, 4], decoder="lut", m=m, perm=True, outlier_frac=0.01, bias=True, seed=31)
    y = kernels.linear(x, layer)
    assert y.shape == (m, 72) and y.dtype == x.dtype
    if m:
        assert rel_err(y, reference_fp32(x, layer)) < TOL[x.dtype]


def test_launchers_validate_arguments():
    x, layer = make(40, 64, m=2)
    with pytest.raises(ValueError, match="x must be"):
        gemv(x[:, :32], layer)
    with pytest.raises(ValueError, match="out must be"):
        gemm(x, layer, out=torch.empty(2, 41, dtype=x.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="M=9"):
        gemv(torch.zeros(9, 64, dtype=x.dtype, device=DEVICE), layer)
