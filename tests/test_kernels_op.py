"""The custom op around the kernels: fake implementation, torch.compile, dispatch registration, tuning cache."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tacq_kernels
from tacq_kernels import QuantLinear, ops, reference
from tacq_kernels.kernels import tuning
from tacq_kernels.testing import random_layer


def _module(**kwargs):
    layer = random_layer(48, 96, bits=[2, 4], decoder=["affine", "lut"], outlier_frac=0.02, perm=True, bias=True)
    return QuantLinear.from_packed(layer, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_impl_gives_shape_and_dtype(dtype):
    m = _module()
    with FakeTensorMode() as mode:
        x = torch.empty(7, 96, dtype=dtype)
        tensors = [mode.from_tensor(getattr(m, n)) for n in m.tensor_names()]
        y = torch.ops.tacq_kernels.quant_linear(x, tensors, m._spec_ints)
    assert y.shape == (7, 48) and y.dtype == dtype


def test_opcheck():
    # Schema, fake/real agreement, autograd registration and the dispatcher's other checks.
    m = _module()
    x = torch.randn(4, 96, dtype=torch.float16)
    torch.library.opcheck(torch.ops.tacq_kernels.quant_linear, (x, [getattr(m, n) for n in m.tensor_names()],
                                                                 m._spec_ints))


def test_cuda_kernel_is_registered_inside_the_op():
    # CUDA tensors go to the Triton kernels through the op's own CUDA registration, so the choice
    # of kernel by M happens inside one op (no Python branch for dynamo to guard on).
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tacq_kernels::quant_linear", "CUDA")


# inductor compiles the CPU graph with a C++ compiler (a few seconds here); aot_eager checks the
# same tracing (fake impl, functionalization) without it.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    m = _module(cache_dequantized=False)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    for rows in (1, 3, 5, 9):
        x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), m(x))
    # One graph for the first shape, one with a dynamic batch size; no recompile per batch size.
    assert counters["stats"]["unique_graphs"] <= 2


def test_compile_with_dense_cache_module_still_uses_the_op():
    # The CPU dense cache is an eager-only shortcut; under compile the module calls the op.
    torch._dynamo.reset()
    m = _module(cache_dequantized=True)
    x = torch.randn(3, 96)
    expect = reference.linear(x, m.to_packed())
    assert torch.equal(torch.compile(m, fullgraph=True, backend="aot_eager")(x), expect)
    assert torch.equal(m(x), expect)


def test_warmup_skips_cpu_modules():
    model = torch.nn.Sequential(_module(), torch.nn.ReLU())
    assert tacq_kernels.warmup(model, batch_sizes=(1, 16)) == 0
    assert ops.DEFAULT_WARMUP_BATCH_SIZES[0] == 1


def test_tuning_cache_roundtrip(tmp_path):
    # Off the GPU, pick() returns the first (default) candidate and caches nothing.
    called = []
    cfg = tuning.pick(("k", 1), [{"A": 1}, {"A": 2}], lambda c: called.append(c), torch.device("cpu"))
    assert cfg == {"A": 1} and not called
    tuning.clear_cache()
    tuning._cache[("gemv", 1, 4096, "torch.float16")] = {"BLOCK_N": 128, "SPLIT_K": 4}
    tuning.save_cache(tmp_path / "tuned.json")
    tuning.clear_cache()
    assert tuning.load_cache(tmp_path / "tuned.json") == 1
    assert tuning.pick(("gemv", 1, 4096, "torch.float16"), [{"BLOCK_N": 64}], None, torch.device("cpu")) == {
        "BLOCK_N": 128, "SPLIT_K": 4
    }
    tuning.clear_cache()
