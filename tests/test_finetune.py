"""Distillation fine-tuning of the stored 16-bit values (codebooks, scales/zeros, kept weights)."""

import pytest
import torch

from tacq_kernels.packing import unpack_codes
from tacq_kernels.reference import dequantize
from tacq_kernels.testing import random_layer
from tacq_quant.finetune import FinetuneConfig, TunableLinear, finetune_layers
from tacq_quant.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [
    dict(bits=3, decoder="lut"),
    dict(bits=(2, 3, 4), decoder="lut"),  # CLAQ adaptive precision: three segments
    dict(bits=2, decoder="affine", group_size=32),
    dict(bits=(3, 2), decoder=("lut", "affine")),
]


@pytest.mark.parametrize("kw", LAYERS, ids=lambda kw: f"{kw['decoder']}-{kw['bits']}")
@pytest.mark.parametrize("outliers", [0.0, 0.05])
def test_tunable_weight_is_the_reference_decode(kw, outliers):
    layer = random_layer(40, 96, outlier_frac=outliers, perm=True, bias=True, seed=3, **kw)
    m = TunableLinear(layer)
    assert torch.equal(m.weight(), dequantize(layer))
    # untrained export stores the same values
    out = m.export()
    assert out.spec == layer.spec
    for name, t in layer.tensors.items():
        assert torch.equal(out.tensors[name], t), name
    x = torch.randn(3, 96)
    torch.testing.assert_close(m(x), x @ dequantize(layer).t() + layer.bias.float(), rtol=1e-5, atol=1e-6)


def test_codebook_gradient_is_the_sum_over_its_code():
    layer = random_layer(24, 64, bits=3, decoder="lut", outlier_frac=0.05, perm=True, seed=4)
    m = TunableLinear(layer)
    w = m.weight()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    (w * g).sum().backward()
    codes = unpack_codes(layer.segment_tensors(0), 3, 64)  # [N, k], storage column order
    g_storage = g[:, layer.perm.long()]
    expect = torch.zeros(64, 8)
    for j in range(64):
        for c in range(8):
            expect[j, c] = g_storage[:, j][codes[:, j] == c].sum()
    torch.testing.assert_close(m.lut0.grad, expect, rtol=1e-5, atol=1e-6)
    rows = torch.repeat_interleave(torch.arange(24), layer.tensors["sparse_row_ptr"].long().diff())
    torch.testing.assert_close(m.sparse_val.grad, g[rows, layer.tensors["sparse_col"].long()])


def _quantized_tiny(seed=0):
    """A tiny model and CLAQ-style layers for every linear, from RTN-like random codebooks fitted to
    the weights (nearest of 8 quantiles per column): a damaged model to repair."""
    from tacq_kernels import SegmentData, build_layer
    from tacq_quant.tacq import target_linears

    model = tiny_llama(seed=seed)
    layers = {}
    for name, lin in target_linears(model).items():
        w = lin.weight.detach()
        q = torch.linspace(0.02, 0.98, 4)
        lut = torch.quantile(w.t(), q, dim=1).t().contiguous()  # [K, 4]: 2-bit codebook per column
        codes = (w.t().unsqueeze(-1) - lut.unsqueeze(1)).abs().argmin(-1).t()  # [N, K]
        layers[name] = build_layer([SegmentData(2, codes, "lut", lut=lut.half())], name=name)
    return model, layers


def test_finetune_lowers_the_kl_and_keeps_codes_and_specs():
    teacher = tiny_llama(seed=0)
    student, layers = _quantized_tiny(seed=0)
    windows = torch.randint(0, 257, (16, 32), generator=torch.Generator().manual_seed(1))
    before = {n: p.clone() for n, p in student.named_parameters()}

    def kl(layer_set):
        m, _ = _quantized_tiny(seed=0)
        from tacq_quant.finetune import _swap_module
        for n, l in layer_set.items():
            _swap_module(m, n, TunableLinear(l))
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=windows).logits, -1)
            s = torch.log_softmax(m(input_ids=windows).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    out, report = finetune_layers(student, teacher, layers, windows,
                                  FinetuneConfig(steps=16, batch_size=4, lr=3e-3, precision="fp32"), progress=False, log=lambda m: None)
    assert report["steps"] == 16
    assert kl(out) < 0.7 * kl(layers)  # measured on the same windows: the values were trained
    for n, l in layers.items():
        assert out[n].spec == l.spec
        for t in ("seg0_q2", "sparse_row_ptr", "sparse_col"):
            assert torch.equal(out[n].tensors[t], l.tensors[t]), (n, t)
        assert not torch.equal(out[n].tensors["seg0_lut"], l.tensors["seg0_lut"])
    # the student is given back as it came: same modules, same frozen values, trainable again
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad, n
    assert not any(isinstance(m, TunableLinear) for m in student.modules())


def test_pipeline_finetune_lowers_the_kl_and_keeps_the_codes(tmp_path):
    from tacq_quant.data import load_calibration
    from tacq_quant.pipeline import QuantizeConfig, quantize_model
    from tacq_quant.tiny import byte_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text("Quantization maps weights to a few levels; outliers stay in sixteen bits. " * 60)
    tok = byte_tokenizer()
    calib = load_calibration(str(text), tok, nsamples=8, seqlen=48, seed=1)
    teacher = tiny_llama(seed=0)
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=calib.windows).logits, -1)
    results = {}
    for steps in (0, 12):
        model = tiny_llama(seed=0)
        cfg = QuantizeConfig("tacq", 2, outlier_frac=0.01, base="claq", finetune_steps=steps, finetune_lr=3e-3,
                             finetune_precision="fp32")
        out = quantize_model(model, calib, cfg, progress=False, log=lambda *_: None)
        with torch.no_grad():
            s_logp = torch.log_softmax(model(input_ids=calib.windows).logits, -1)
        results[steps] = (float((t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()), out)
    (kl0, out0), (kl1, out1) = results[0], results[12]
    assert kl1 < 0.8 * kl0
    assert "finetune_steps" not in out0.method_args and out1.method_args["finetune_steps"] == 12
    assert out1.stages["finetune"]["steps"] == 12 and out1.stages["finetune"]["precision"] == "fp32"
    for name, layer in out0.packed.items():  # the fine-tune changes values, never codes or structure
        tuned = out1.packed[name]
        assert tuned.spec == layer.spec
        for t, v in layer.tensors.items():
            if not t.endswith(("_lut", "sparse_val")):
                assert torch.equal(tuned.tensors[t], v), (name, t)


def test_finetune_settings_are_checked():
    from tacq_quant.pipeline import ConfigError, QuantizeConfig

    for bad in (dict(finetune_steps=-1), dict(finetune_steps=4, finetune_lr=0.0),
                dict(finetune_steps=4, finetune_batch_size=0), dict(finetune_steps=4, finetune_precision="fp8")):
        with pytest.raises(ConfigError, match="fine-tune"):
            QuantizeConfig("gptq", 3, **bad).validate()


def test_cli_finetune_writes_a_loadable_checkpoint(tmp_path, capsys):
    import json

    import tacq_kernels
    from tacq_quant.cli import main
    from tacq_quant.tiny import save_tiny_model

    text = tmp_path / "calib.txt"
    text.write_text("Outliers stay in sixteen bits while the rest goes to two. " * 60)
    model_dir = save_tiny_model(str(tmp_path / "tiny"))
    out = str(tmp_path / "q")
    rc = main(["quantize", "--model", model_dir, "--method", "claq", "--bits", "2", "--calib", str(text),
               "--nsamples", "4", "--seqlen", "40", "--finetune-steps", "3", "--finetune-lr", "1e-3",
               "--finetune-precision", "fp32", "--out", out, "--quiet"])
    assert rc == 0
    assert "fine-tune: 3 steps of 4 windows (fp32)" in capsys.readouterr().err
    args = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["method_args"]
    assert args["finetune_steps"] == 3 and args["finetune_lr"] == 1e-3
    report = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert report["stages"]["finetune"]["steps"] == 3 and report["stages"]["finetune_seconds"] > 0
    assert len(tacq_kernels.quantized_layers(tacq_kernels.load(out))) == 14
    rc = main(["quantize", "--model", model_dir, "--method", "claq", "--bits", "2", "--calib", str(text),
               "--finetune-steps", "-2", "--out", str(tmp_path / "bad"), "--quiet"])
    assert rc != 0 and "--finetune-steps) must be >= 0, got -2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
