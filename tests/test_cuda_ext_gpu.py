"""The CUDA C++ GEMV (tacq_cuda::gemv, csrc/) on a GPU: skipped without CUDA or without the extension.

Real shapes (Llama-3-8B and Llama-2-70B layers), every bit-width and decoder (affine per row,
groups of 128, groups of 48 for the generic path, LUT), 0.35 % outliers, permutation, fp16 and
bf16 activations, M = 1..8, the output poisoned with NaN before the call (every element must be
written). Tolerances as tests/test_kernels_gpu.py. Then the op through torch.compile and a CUDA
graph, and the dispatch (TACQ_CUDA=1 sends quant_linear to it; the probe of TACQ_CUDA=auto).
benchmarks/gpu_check.sh runs this file (step cuda-gemv-test).
"""

from __future__ import annotations

import pytest
import torch

from tacq_kernels import cuda_ext, reference
from tacq_kernels.ops import spec_to_ints
from tacq_kernels.testing import random_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (K, N): Llama-3-8B q/o, k/v, up/gate, down; Llama-2-70B q/o, up/gate, down
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
CASES = [(2, "affine", None), (3, "affine", None), (4, "affine", None), (2, "affine", 128), (3, "affine", 128),
         (3, "affine", 48), (2, "lut", None), (3, "lut", None), (4, "lut", None)]


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not cuda_ext.load(verbose=False):
        pytest.fail(f"the CUDA extension did not load on a CUDA machine: {cuda_ext.load_error()}")


def _args(layer):
    return [layer.tensors[n] for n in layer.spec.tensor_specs()], spec_to_ints(layer.spec)


def _check(layer, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, layer.spec.in_features, device="cuda", generator=g).to(dtype)
    tensors, ints = _args(layer)
    out = torch.full((m, layer.spec.out_features), float("nan"), device="cuda", dtype=dtype)
    torch.ops.tacq_cuda.gemv_out(x, tensors, ints, out)
    y_ref = x.float() @ reference.dequantize(layer).t()
    if layer.bias is not None:
        y_ref += layer.bias.float()
    assert not torch.isnan(out).any()
    err = float((out.float() - y_ref).norm() / y_ref.norm())
    assert err < TOL[dtype], f"relative error {err:.2e}"
    y = torch.ops.tacq_cuda.gemv(x, tensors, ints)
    assert torch.equal(y.isnan(), out.isnan()) and float((y.float() - y_ref).norm() / y_ref.norm()) < TOL[dtype]
    return err


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bits,decoder,group", CASES)
def test_real_shapes_every_decoder(k, n, bits, decoder, group):
    layer = random_layer(n, k, bits=bits, decoder=decoder, group_size=group, outlier_frac=0.0035,
                         perm=decoder == "lut" or group == 48, device="cuda", seed=k + n + bits,
                         generate_on_device=True)
    for m, dtype in [(1, torch.float16), (1, torch.bfloat16), (4, torch.float16), (8, torch.bfloat16),
                     (3, torch.float16)]:
        _check(layer, m, dtype, seed=m)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_segments_bias_int32_columns(m):
    claq = random_layer(4096, 14336, bits=[2, 4, 3], decoder="lut", outlier_frac=0.0035, perm=True, bias=True,
                        device="cuda", generate_on_device=True)
    _check(claq, m, torch.bfloat16)
    wide = random_layer(1024, 40000, bits=3, outlier_frac=0.001, device="cuda", generate_on_device=True)
    assert wide.spec.col_dtype == "int32"
    _check(wide, m, torch.float16)


def test_compile_graph_and_dispatch(monkeypatch):
    layer = random_layer(4096, 4096, bits=3, outlier_frac=0.0035, device="cuda")
    tensors, ints = _args(layer)
    x = torch.randn(1, 4096, device="cuda").half()
    want = torch.ops.tacq_cuda.gemv(x, tensors, ints)
    compiled = torch.compile(lambda x: torch.ops.tacq_cuda.gemv(x, tensors, ints), fullgraph=True)
    got = compiled(x)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-5  # atomics: sum order may differ
    graph = torch.cuda.CUDAGraph()
    static_out = torch.empty_like(want)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        torch.ops.tacq_cuda.gemv_out(x, tensors, ints, static_out)
    graph.replay()
    torch.cuda.synchronize()
    assert float((static_out.float() - want.float()).norm() / want.float().norm()) < 1e-5  # atomics: order may differ
    # dispatch: TACQ_CUDA=1 routes quant_linear's small-M calls to the CUDA op
    monkeypatch.setenv("TACQ_CUDA", "1")
    y = torch.ops.tacq_kernels.quant_linear(x, tensors, ints)
    assert float((y.float() - want.float()).norm() / want.float().norm()) < 1e-5
    monkeypatch.setenv("TACQ_CUDA", "auto")
    from tacq_kernels.kernels import tuning

    y = torch.ops.tacq_kernels.quant_linear(x, tensors, ints)
    probe = tuning._cache[cuda_ext._probe_key(x, layer)]
    print("probe:", probe)
    assert probe["rel_err"] < 1e-2 and probe["triton_ms"] > 0
