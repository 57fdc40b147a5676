"""GPTQ, RTN and the affine quantizer (tacq_quant.gptq / rtn / affine / quantized_weight)."""

import pytest
import torch

from tacq_kernels.reference import dequantize
from tacq_quant.affine import dequantize_codes, fill_kept_with_row_mean, fit_affine, quantize_codes
from tacq_quant.gptq import (AffineColumnQuantizer, HessianAccumulator, gptq_quantize, inverse_hessian_factor,
                             relative_output_error)
from tacq_quant.rtn import rtn_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_problem(n_tokens=2048, k=64, n=48, seed=0):
    """Inputs with strongly correlated features (a low-rank mix plus noise) and heavy-ish weights."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    x = z @ mix + 0.1 * torch.randn(n_tokens, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 8  # a few outliers
    acc = HessianAccumulator(k)
    for chunk in x.split(512):
        acc.add(chunk)
    return x, w, acc.hessian()


def output_error(x, w, w_hat):
    return float(torch.linalg.norm(x @ w.t() - x @ w_hat.t()))


def naive_gptq(w, h, scale, zero, bits, keep=None, percdamp=0.01):
    """Textbook unblocked GPTQ with fixed per-row affine parameters, written independently of
    tacq_quant.gptq: quantize column j, propagate its error to every later column at once."""
    w = w.clone().double()
    h = h.clone().double()
    k = w.shape[1]
    h += percdamp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    updated = torch.zeros_like(w)
    s, z = scale.double(), zero.double()
    for j in range(k):
        col = w[:, j].clone()
        updated[:, j] = col
        qc = (torch.clamp(torch.round(col / s) + z, 0, 2**bits - 1) - z) * s
        if keep is not None:
            qc = torch.where(keep[:, j], col, qc)
        q[:, j] = qc
        err = (col - qc) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return q.float(), updated.float()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    x, w, h = correlated_problem()
    rtn = dequantize(rtn_quantize(w, bits).pack())
    gptq = gptq_quantize(w, h, AffineColumnQuantizer(bits)).weight
    gptq_w = dequantize(gptq.pack())
    e_rtn, e_gptq = output_error(x, w, rtn), output_error(x, w, gptq_w)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the Hessian-based error the summary table reports is the same quantity, relative
    rel = relative_output_error(w, gptq_w, h)
    assert rel == pytest.approx(e_gptq / float(torch.linalg.norm(x @ w.t())), rel=1e-3)


def test_gptq_beats_rtn_with_groups_and_act_order():
    x, w, h = correlated_problem(k=128, seed=1)
    for act_order in (False, True):
        rtn = dequantize(rtn_quantize(w, 2, group_size=32).pack())
        res = gptq_quantize(w, h, AffineColumnQuantizer(2, group_size=32), act_order=act_order)
        packed = res.weight.pack()
        assert packed.spec.segments[0].group_size == 32
        assert packed.spec.has_perm == act_order
        assert output_error(x, w, dequantize(packed)) < 0.8 * output_error(x, w, rtn)


@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_lazy_blocks_equal_textbook_gptq(blocksize):
    _, w, h = correlated_problem(k=40, n=16, seed=2)
    quant = AffineColumnQuantizer(3, clip_search=False)
    res = gptq_quantize(w, h, quant, blocksize=blocksize)
    ref, _ = naive_gptq(w, h, quant.scale[0], quant.zero[0], 3)
    torch.testing.assert_close(res.dequantized, ref, rtol=0, atol=1e-4)


def test_masked_gptq_keeps_the_gptq_updated_value():
    _, w, h = correlated_problem(k=64, n=32, seed=3)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.05
    quant = AffineColumnQuantizer(2, clip_search=False)
    res = gptq_quantize(w, h, quant, keep_mask=keep, blocksize=16)
    ref_q, ref_updated = naive_gptq(w, h, quant.scale[0], quant.zero[0], 2, keep=keep)
    # kept weights hold their value at the time their column was quantized (not the original W)
    torch.testing.assert_close(res.weight.kept_values[keep], ref_updated[keep], rtol=0, atol=1e-5)
    assert not torch.allclose(res.weight.kept_values[keep], w[keep])
    torch.testing.assert_close(res.dequantized, ref_q, rtol=0, atol=1e-4)
    assert torch.equal(res.weight.keep_mask, keep)
    # the kept weights were excluded from the scale fit: the fit equals a fit on the row-mean-filled W
    s, z = fit_affine(fill_kept_with_row_mean(w, keep), 2, clip_search=False)
    torch.testing.assert_close(quant.scale[0], s)
    torch.testing.assert_close(quant.zero[0], z)


def test_masked_gptq_with_act_order_maps_the_mask_back():
    _, w, h = correlated_problem(k=64, n=32, seed=4)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[3, 5] = keep[10, 60] = keep[0, 0] = True
    res = gptq_quantize(w, h, AffineColumnQuantizer(2), keep_mask=keep, act_order=True)
    assert torch.equal(res.weight.keep_mask, keep)
    packed = res.weight.pack()
    assert packed.spec.nnz == 3 and packed.spec.has_perm
    eff = dequantize(packed)
    # affine: the code at a kept position decodes to 0, so the checkpoint holds fp16(kept) exactly
    assert torch.equal(eff[keep], res.weight.kept_values[keep].half().float())


def test_checkpoint_decode_equals_loop_values():
    """The loop quantizes with fp16-representable scales, so the packed layer decodes to exactly
    the values GPTQ propagated errors from (outside kept positions)."""
    _, w, h = correlated_problem(k=96, n=24, seed=5)
    res = gptq_quantize(w, h, AffineColumnQuantizer(3, group_size=32), act_order=True)
    assert torch.equal(dequantize(res.weight.pack()), res.dequantized)


def test_affine_fit_clip_search_and_fp16_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * 0.02  # Gaussian rows: at 2 bits clipping the tails pays
    s_mm, z_mm = fit_affine(x, 2, clip_search=False)
    s, z = fit_affine(x, 2)

    def err(s, z):
        q = dequantize_codes(quantize_codes(x, s[:, None], z[:, None], 2), s[:, None], z[:, None])
        return (q - x).abs().pow(2.4).sum(1)

    assert bool((err(s, z) <= err(s_mm, z_mm) + 1e-12).all())  # p = 1 is one of the candidates
    assert float(err(s, z).sum()) < 0.8 * float(err(s_mm, z_mm).sum())
    for t in (s, s_mm):
        assert torch.equal(t, t.half().float())  # exactly what the checkpoint stores
    assert bool(((z >= 0) & (z <= 3) & (z == z.round())).all())
    # the range always contains 0 and an all-zero row gets [-1, 1]
    s0, z0 = fit_affine(torch.zeros(2, 8), 2, clip_search=False)
    torch.testing.assert_close(s0, torch.full((2,), 2 / 3).half().float())


def test_damping_retries_on_singular_hessian():
    # eigenvalues 1, 1, 1, -0.015: one damping step (0.01 * mean diag = 0.0075) is not enough, three are
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    h = (q @ torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.015], dtype=torch.float64)) @ q.t()).float()
    factor, damp = inverse_hessian_factor(h, 0.01)
    assert damp == pytest.approx(0.03) and bool(torch.isfinite(factor).all())


def test_dead_inputs_are_zeroed_and_do_not_break_the_loop():
    _, w, h = correlated_problem(k=32, n=8, seed=6)
    h[:, 3] = 0
    h[3, :] = 0
    res = gptq_quantize(w, h, AffineColumnQuantizer(2))
    assert res.info["dead_inputs"] == 1
    assert bool(torch.isfinite(res.dequantized).all())


def test_rtn_groups_and_ragged_k():
    w = torch.randn(10, 70) * 0.1
    qw = rtn_quantize(w, 4, group_size=32)
    packed = qw.pack()
    assert packed.spec.segments[0].n_groups == 3
    deq = dequantize(packed)
    # 4-bit RTN error is at most half a step (plus clipping) per group
    assert float((deq - w).abs().max()) < 0.1
