"""TACQ: per-sample |gradients|, the saliency score, the exact global top-k, the kept weights."""

import pytest
import torch

from tacq_quant.data import CalibrationData
from tacq_quant.pipeline import QuantizeConfig, quantize_model
from tacq_quant.tacq import (accumulate_abs_gradients, cached_abs_gradients, keep_count, saliency, select_top_k,
                             target_linears)
from tacq_quant.tiny import tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def samples_of_mixed_lengths(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (n,), generator=g) for n in (9, 23, 5, 23, 16, 2, 31)]


def brute_force_abs_gradients(model, samples):
    """Independent reference: one sample at a time (batch size 1), ordinary autograd on the
    weights, |grad| summed over samples, in fp32."""
    names = list(target_linears(model))
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n + ".weight"]) for n in names}
    for s in samples:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=s[None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], s[1:])  # mean over the sample's tokens
        loss.backward()
        for n in names:
            total[n] += params[n + ".weight"].grad.abs()
    model.zero_grad(set_to_none=True)
    return total


def test_tacq_score_equals_brute_force_on_a_tiny_model():
    model = tiny_llama(seed=1)
    samples = samples_of_mixed_lengths()
    ref = brute_force_abs_gradients(model, samples)
    # batches of several right-padded samples: per-sample gradients must still be separate
    ours = accumulate_abs_gradients(model, samples, max_batch_tokens=64, device="cpu", progress=False)
    assert set(ours) == set(ref)
    g = torch.Generator().manual_seed(5)
    for name, m in target_linears(model).items():
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-7)
        w = m.weight.detach()
        q = w + 0.01 * torch.randn(w.shape, generator=g)  # any Q(W)
        expect = w.abs() * ref[name] * (q - w).abs()
        torch.testing.assert_close(saliency(w, ours[name], q), expect, rtol=1e-4, atol=1e-12)
    # |.| is per sample: the sum of |g_s| is not |sum g_s|
    name = next(iter(ref))
    model.zero_grad(set_to_none=True)
    loss = sum(torch.nn.functional.cross_entropy(model(input_ids=s[None]).logits[0][:-1], s[1:]) for s in samples)
    loss.backward()
    summed = dict(model.named_parameters())[name + ".weight"].grad.abs()
    assert float((ref[name] - summed).abs().max()) > 1e-3 * float(ref[name].abs().max())
    # the model is left as it was
    assert all(p.requires_grad for p in model.parameters())


def test_top_k_is_exact_with_ties():
    scores = {
        "a": torch.tensor([[5.0, 1.0, 3.0], [3.0, 3.0, 0.0]]),
        "b": torch.tensor([3.0, 3.0, 7.0, 2.0]),
    }
    for k in range(0, 11):
        masks = select_top_k(scores, k)
        assert sum(int(m.sum()) for m in masks.values()) == k
        chosen = torch.cat([scores[n].flatten()[masks[n].flatten()] for n in scores])
        rest = torch.cat([scores[n].flatten()[~masks[n].flatten()] for n in scores])
        if k and rest.numel():
            assert float(chosen.min()) >= float(rest.max())
    # k = 4 cuts through the five 3.0 ties: 7 and 5 first, then the first two 3.0 in order
    masks = select_top_k(scores, 4)
    assert masks["a"].tolist() == [[True, False, True], [True, False, False]]
    assert masks["b"].tolist() == [False, False, True, False]
    assert keep_count(1000, 0.0035) == 4 and keep_count(106168320, 0.0035) == 371589
    with pytest.raises(ValueError):
        select_top_k({"a": torch.tensor([float("nan"), 1.0])}, 1)


def calib_windows(n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationData(torch.randint(0, 257, (n, seqlen), generator=g), None, "random", "random")


@pytest.mark.parametrize("bits", [2, 3])
def test_tacq_keeps_exactly_the_requested_count_and_reproduces_kept_weights(bits):
    model = tiny_llama(seed=2)
    n_weights = sum(m.weight.numel() for m in target_linears(model).values())
    frac = 0.013
    kept = {}
    out = quantize_model(model, calib_windows(), QuantizeConfig("tacq", bits, outlier_frac=frac), progress=False,
                         log=lambda *_: None, on_layer=lambda name, qw: kept.__setitem__(name, qw))
    k = round(frac * n_weights)
    assert out.method_args["kept"] == k
    assert sum(p.spec.nnz for p in out.packed.values()) == k
    assert sum(qw.n_kept for qw in kept.values()) == k
    # global, not per layer: the counts differ between matrices
    assert len({p.spec.nnz for p in out.packed.values()}) > 1
    from tacq_kernels.reference import dequantize

    for name, packed in out.packed.items():
        qw = kept[name]
        if not qw.n_kept:
            continue
        eff = dequantize(packed)
        # the checkpoint holds each kept weight exactly as its fp16 value (dense code decodes to 0)
        assert torch.equal(eff[qw.keep_mask], qw.kept_values[qw.keep_mask].half().float())
        # and the model in memory holds what the checkpoint decodes
        assert torch.equal(dict(model.named_modules())[name].weight.detach(), eff)


@pytest.mark.parametrize("bits", [2, 3.1])
def test_tacq_over_claq_codebooks_keeps_exact_weights_out_of_the_codebooks(bits):
    """--base claq: the same global top-k, kept weights stored exactly (to fp16 rounding), the rest
    on per-column k-means codebooks (LUT segments)."""
    from tacq_kernels.reference import dequantize, dequantize_dense

    model = tiny_llama(seed=2)
    n_weights = sum(m.weight.numel() for m in target_linears(model).values())
    frac = 0.013
    kept = {}
    out = quantize_model(model, calib_windows(), QuantizeConfig("tacq", bits, outlier_frac=frac, base="claq"),
                         progress=False, log=lambda *_: None, on_layer=lambda name, qw: kept.__setitem__(name, qw))
    k = round(frac * n_weights)
    assert out.method_args["kept"] == k and out.method_args["base"] == "claq"
    assert out.method_args["act_order"] is True  # CLAQ's default
    assert sum(p.spec.nnz for p in out.packed.values()) == k
    for name, packed in out.packed.items():
        assert all(seg.decoder == "lut" for seg in packed.spec.segments)
        qw = kept[name]
        if not qw.n_kept:
            continue
        eff = dequantize(packed)
        # a LUT code decodes to its centroid c, so a kept weight w is stored as c + fp16(w - c)
        # (tacq_quant.quantized_weight): exact up to the fp16 rounding of the difference
        w, c = qw.kept_values[qw.keep_mask], dequantize_dense(packed)[qw.keep_mask]
        assert bool(((eff[qw.keep_mask] - w).abs() <= 2**-11 * (w - c).abs() + 2**-25).all())
        assert torch.equal(dict(model.named_modules())[name].weight.detach(), eff)
    if bits == 3.1:  # adaptive precision: 4-bit and 3-bit LUT segments
        assert {s.bits for p in out.packed.values() for s in p.spec.segments} == {3, 4}


def test_claq_codebook_fit_ignores_kept_weights():
    """A column whose kept weights are far outliers: without the mask k-means spends a centroid on
    them; with the mask every centroid lies inside the range of the non-kept values."""
    from tacq_quant.claq import KMeansColumnQuantizer
    from tacq_quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    n, k = 64, 8
    w = torch.randn(n, k, generator=g) * 0.02
    keep = torch.zeros(n, k, dtype=torch.bool)
    keep[:3, :] = True
    w[:3, :] = 5.0  # huge, and kept
    x = torch.randn(256, k, generator=g)
    h = x.t() @ x
    luts = {}
    for masked in (False, True):
        q = KMeansColumnQuantizer(2, seed=1)
        res = gptq_quantize(w, h, q, keep_mask=keep if masked else None)
        luts[masked] = res.weight.segments[0].lut
        if masked:
            assert torch.equal(res.dequantized[keep], w[keep])  # kept exactly (no earlier column had error there)
    assert float(luts[False].max()) > 1.0  # a centroid went to the outliers
    assert float(luts[True].abs().max()) < 0.2  # none did once they are kept


def test_weighted_codebooks_follow_the_importance_and_skip_kept_weights():
    """importance (per-weight k-means weights, original column order, permuted with act-order): a
    column whose heavy rows sit apart gets a centroid on them only when weighted; each column's
    codebook is the weighted k-means of its non-kept current values (checked on the first column
    in act-order, whose values no error has changed yet)."""
    from tacq_quant.claq import KMeansColumnQuantizer
    from tacq_quant.gptq import gptq_quantize
    from tacq_quant.kmeans import kmeans_1d

    g = torch.Generator().manual_seed(3)
    n, k = 96, 6
    w = torch.randn(n, k, generator=g) * 0.02
    w[:6] += 0.15  # a small group of rows apart from the rest
    imp = torch.full((n, k), 1e-3)
    imp[:6] = 10.0  # ... that matter most
    keep = torch.zeros(n, k, dtype=torch.bool)
    keep[10:13] = True
    x = torch.randn(512, k, generator=g) * torch.linspace(0.5, 2.0, k)  # act-order = reversed columns
    h = x.t() @ x
    luts = {}
    for weighted in (False, True):
        res = gptq_quantize(w, h, KMeansColumnQuantizer(2, seed=1), act_order=True, keep_mask=keep,
                            importance=imp if weighted else None)
        luts[weighted] = res.weight.segments[0].lut
        first = int(res.weight.perm[0])
        assert first == k - 1
        free = ~keep[:, first]
        c, _ = kmeans_1d(w[free, first], 4, generator=torch.Generator().manual_seed(1),
                         sample_weight=imp[free, first] if weighted else None)
        torch.testing.assert_close(luts[weighted][0], c.half().float().sort().values, rtol=0, atol=0)
    near = lambda lut: (lut - w[:6].mean()).abs().min(dim=1).values  # noqa: E731
    assert bool((near(luts[True]) < 0.01).all())
    assert float((near(luts[True]) - near(luts[False])).mean()) < 0


def test_codebook_weights_option_is_recorded_and_changes_the_codebooks():
    """--codebook-weights g2 reaches every matrix's k-means (in both passes) and the checkpoint's
    method_args; it is refused where there are no gradients or no k-means."""
    model = tiny_llama(seed=2)
    out = {}
    for cw in ("none", "g2"):
        m = tiny_llama(seed=2)
        out[cw] = quantize_model(m, calib_windows(), QuantizeConfig("tacq", 2, outlier_frac=0.01, base="claq",
                                                                    codebook_weights=cw),
                                 progress=False, log=lambda *_: None)
    assert "codebook_weights" not in out["none"].method_args
    assert out["g2"].method_args["codebook_weights"] == "g2"
    from tacq_kernels.reference import dequantize

    changed = [n for n in out["none"].packed
               if not torch.equal(dequantize(out["none"].packed[n]), dequantize(out["g2"].packed[n]))]
    assert len(changed) == len(target_linears(model))  # every matrix's codebooks moved
    with pytest.raises(ValueError, match="needs --method tacq --base claq"):
        QuantizeConfig("tacq", 3, base="gptq", codebook_weights="g").validate()
    with pytest.raises(ValueError, match="must be one of"):
        QuantizeConfig("tacq", 3, base="claq", codebook_weights="fisher").validate()


def test_gradient_cache_roundtrip(tmp_path):
    model = tiny_llama(seed=3)
    samples = samples_of_mixed_lengths(1)
    path = str(tmp_path / "g.safetensors")
    first, info1 = cached_abs_gradients(model, samples, path, device="cpu", progress=False)
    again, info2 = cached_abs_gradients(model, samples, path, device="cpu", progress=False)
    assert info1["cache"] == "written" and info2["cache"] == "hit"
    for n in first:
        assert torch.equal(first[n], again[n])
    _, info3 = cached_abs_gradients(model, samples[:-1], path, device="cpu", progress=False)
    assert info3["cache"] == "stale"  # other samples: recomputed


def test_saliency_ablations():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    q = torch.tensor([[1.5, -2.0], [0.0, 1.0]])
    assert torch.allclose(saliency(w, g, q), torch.tensor([[0.05, 0.0], [0.075, 0.0]]))
    assert torch.allclose(saliency(w, g, q, "qal"), torch.tensor([[0.05, 0.0], [0.15, 0.4]]))
    assert torch.allclose(saliency(w, g, q, "msg"), torch.tensor([[0.1, 0.4], [0.15, 0.0]]))
    assert torch.equal(saliency(w, None, None, "magnitude"), w.abs())
    # magnitude needs neither gradients nor Q(W): the pipeline skips both passes
    model = tiny_llama(seed=6)
    out = quantize_model(model, calib_windows(), QuantizeConfig("tacq", 2, outlier_frac=0.01, saliency="magnitude"),
                         progress=False, log=lambda *_: None)
    assert "gradient_seconds" not in out.stages and out.method_args["saliency"] == "magnitude"


def test_unknown_saliency_is_refused_before_any_input_is_used():
    with pytest.raises(ValueError, match="unknown saliency 'bogus'"):
        saliency(torch.ones(2, 2), None, None, "bogus")


def test_gradient_pass_hessians_are_those_of_the_unpadded_inputs():
    """The Hessians collected in the gradient pass (right-padded batches) equal 2/n sum x x^T of
    every linear's inputs on the unquantized model, one sample at a time; the forwards-only mode
    (a gradient cache hit) gives the same Hessians."""
    model = tiny_llama(seed=2)
    samples = samples_of_mixed_lengths(3)
    linears = target_linears(model)
    seen = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach()[0]))
               for n, m in linears.items()]
    with torch.no_grad():
        for s in samples:
            model(input_ids=s[None])
    for h in handles:
        h.remove()
    hessians, forwards_only = {}, {}
    grads = accumulate_abs_gradients(model, samples, max_batch_tokens=64, device="cpu", progress=False,
                                     hessians=hessians)
    assert set(grads) == set(linears)
    assert accumulate_abs_gradients(model, samples, max_batch_tokens=64, device="cpu", progress=False,
                                    hessians=forwards_only, gradients=False) == {}
    for n in linears:
        x = torch.cat(seen[n])
        assert x.shape[0] == sum(s.numel() for s in samples)  # padding is not counted
        expect = 2 * x.t() @ x / x.shape[0]
        torch.testing.assert_close(hessians[n], expect, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(forwards_only[n], expect, rtol=1e-4, atol=1e-6)


def test_independent_qw_pass_is_the_same_with_one_or_two_workers_and_resumes(tmp_path):
    """The Q(W) pass over fp Hessians: each matrix is what the quantizer gives for its Hessian,
    whatever the number of processes, and a pass resumed from saved layers gives the same."""
    from tacq_quant.parallel import quantize_independent
    from tacq_quant.pipeline import _claq_weight_quantizer
    from tacq_quant.progress import LayerStore

    model = tiny_llama(seed=4)
    samples = samples_of_mixed_lengths(5)
    hessians = {}
    accumulate_abs_gradients(model, samples, device="cpu", progress=False, hessians=hessians, gradients=False)
    quantize = _claq_weight_quantizer(QuantizeConfig(method="claq", bits=2.5))
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    one, eff1 = quantize_independent(model, hessians, quantize, workers=1, progress=False)
    two, eff2 = quantize_independent(model, hessians, quantize, workers=2, progress=False)
    assert list(eff1) == list(before)
    for n, w in before.items():
        assert torch.equal(target_linears(model)[n].weight, w)  # the model is left unchanged
        assert torch.equal(eff1[n], eff2[n])
        assert torch.equal(eff1[n], quantize(n, w, hessians[n]).effective_weight())
        assert not torch.equal(eff1[n], w)
    assert [r.rel_error for r in one.reports] == [r.rel_error for r in two.reports]
    store = LayerStore(str(tmp_path / "qw"), "qw")
    quantize_independent(model, hessians, quantize, workers=2, progress=False, store=store)
    assert store.completed() == len(model.model.layers)
    calls = []

    def counting(name, w, h):
        calls.append(name)
        return quantize(name, w, h)

    again, eff3 = quantize_independent(model, hessians, counting, workers=1, progress=False, store=store)
    assert calls == [] and all(torch.equal(eff1[n], eff3[n]) for n in before)
    # every layer saved: no Hessian is needed at all (a resumed run skips collecting them)
    _, eff4 = quantize_independent(model, {}, counting, workers=1, progress=False, store=store)
    assert calls == [] and all(torch.equal(eff1[n], eff4[n]) for n in before)
    with pytest.raises(ValueError, match="no Hessian for"):
        quantize_independent(model, {}, quantize, workers=1, progress=False)
