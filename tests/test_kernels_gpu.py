"""The kernels at real layer shapes on a GPU (skipped without CUDA).

Llama-2/3 shapes (K and N up to 14336), the batch sizes the issue names (1, 7, 16, 100, 2048,
which land on gemv, gemv, gemm, gemm and prefill), 2 and 3 bits with 0.35 % outliers, through
the dispatching op, plus torch.compile and CUDA-graph capture after warmup. Tolerances as in
test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from tacq_kernels import QuantLinear, kernels, reference, warmup
from tacq_kernels.testing import random_layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): attention, up, down
M_VALUES = [1, 7, 16, 100, 2048]


def _check(layer, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, layer.spec.in_features, device="cuda", generator=g).to(dtype)
    out = torch.full((m, layer.spec.out_features), float("nan"), device="cuda", dtype=dtype)
    kernels.linear(x, layer, out=out)
    y_ref = x.float() @ reference.dequantize(layer).t()
    if layer.bias is not None:
        y_ref += layer.bias.float()
    assert not torch.isnan(out).any()
    err = float((out.float() - y_ref).norm() / y_ref.norm())
    assert err < TOL[dtype], f"{kernels.path_for(m, dtype)}: relative error {err:.2e}"
    # The op (what QuantLinear calls) dispatches to the same kernels.
    tensors = list(layer.tensors[n] for n in layer.spec.tensor_specs())
    from tacq_kernels.ops import spec_to_ints

    y_op = torch.ops.tacq_kernels.quant_linear(x, tensors, spec_to_ints(layer.spec))
    assert float((y_op.float() - y_ref).norm() / y_ref.norm()) < TOL[dtype]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("bits,decoder", [(2, "affine"), (3, "affine"), (3, "lut")])
def test_real_shapes(k, n, m, bits, decoder):
    layer = random_layer(n, k, bits=bits, decoder=decoder, outlier_frac=0.0035, perm=decoder == "lut",
                         device="cuda", seed=k + n + bits)
    _check(layer, m, torch.float16)


@pytest.mark.parametrize("m", M_VALUES)
def test_real_shapes_bf16_claq_mixed_groups(m):
    # CLAQ-like: 2-bit + 4-bit LUT segments with act-order; and affine g128 with bias.
    claq = random_layer(4096, 14336, bits=[2, 4], decoder="lut", outlier_frac=0.0035, perm=True, device="cuda")
    _check(claq, m, torch.bfloat16)
    grouped = random_layer(14336, 4096, bits=3, group_size=128, outlier_frac=0.0035, bias=True, device="cuda")
    _check(grouped, m, torch.bfloat16)


def test_compile_and_cuda_graph_after_warmup():
    layer = random_layer(4096, 4096, bits=3, outlier_frac=0.0035, perm=True, device="cuda")
    module = QuantLinear.from_packed(layer)
    model = torch.nn.Sequential(module)
    assert warmup(model, batch_sizes=(1, 16), dtype=torch.float16) == 2
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 16):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        expect = model(x)
        assert torch.allclose(compiled(x), expect, rtol=1e-3, atol=1e-3)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static_x)  # allocator warm-up on the side stream, as the CUDA-graph docs advise
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(static_y, model(static_x), rtol=1e-3, atol=1e-3)
