"""End to end on a tiny random-initialised Llama: quantize -> save -> tacq_kernels.load -> same
logits as the quantized model in memory, for every method; the CLI on the same; evaluation math."""

import json
import math

import pytest
import torch

import tacq_kernels
from tacq_quant.cli import main
from tacq_quant.data import load_calibration
from tacq_quant.evaluate import continuation_logprobs, multiple_choice, perplexity
from tacq_quant.export import save_quantized
from tacq_quant.pipeline import QuantizeConfig, quantize_model
from tacq_quant.tiny import byte_tokenizer, save_tiny_model, tiny_llama

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few levels; "
    "outliers stay in sixteen bits. Lorem ipsum dolor sit amet, consectetur adipiscing elit. "
) * 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return str(p)


@pytest.fixture
def piqa_file(tmp_path):
    items = [{"goal": f"How to do thing {i}?", "sol1": f"Use the tool number {i}.", "sol2": "Jump around."}
             for i in range(12)]
    p = tmp_path / "valid.jsonl"
    p.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(12)))
    return str(p)


METHOD_CASES = [
    ("rtn", dict(bits=2)),
    ("rtn", dict(bits=3, group_size=16)),
    ("gptq", dict(bits=2)),
    ("gptq", dict(bits=3, group_size=16, act_order=True)),
    ("tacq", dict(bits=2, outlier_frac=0.01)),
    ("tacq", dict(bits=3, outlier_frac=0.0035, act_order=True)),
    ("claq", dict(bits=2)),
    ("claq", dict(bits=2.2, reserve_outliers=True)),
    ("claq", dict(bits=3.1)),
    ("tacq", dict(bits=3, outlier_frac=0.01, base="claq")),
    ("tacq", dict(bits=2.2, outlier_frac=0.005, base="claq")),
    # the distillation fine-tune after a pass: the checkpoint must still be what the model computes
    ("tacq", dict(bits=2, outlier_frac=0.01, base="claq", finetune_steps=3, finetune_lr=1e-3, finetune_precision="fp32")),
    ("gptq", dict(bits=3, group_size=16, finetune_steps=2, finetune_lr=1e-3, finetune_precision="fp32")),
]


@pytest.mark.parametrize("method,kwargs", METHOD_CASES, ids=[f"{m}-{k.get('base', '')}{k['bits']}{'-ft' if k.get('finetune_steps') else ''}"
                              for m, k in METHOD_CASES])
def test_quantize_save_load_same_logits(tmp_path, text_file, method, kwargs):
    model = tiny_llama(seed=0)
    tok = byte_tokenizer()
    calib = load_calibration(text_file, tok, nsamples=6, seqlen=48, seed=1)
    ids = torch.tensor([tok(TEXT[:200])["input_ids"]])
    with torch.no_grad():
        fp_logits = model(input_ids=ids).logits
    out = quantize_model(model, calib, QuantizeConfig(method, **kwargs), progress=False, log=lambda *_: None)
    assert len(out.packed) == 14 and len(out.reports) == 14
    with torch.no_grad():
        mem_logits = model(input_ids=ids).logits
    assert not torch.allclose(mem_logits, fp_logits)  # something was quantized
    ckpt = save_quantized(model, out.packed, tmp_path / "ckpt", tok, method=method, method_args=out.method_args,
                          dtype=None)
    loaded = tacq_kernels.load(ckpt)
    qlayers = tacq_kernels.quantized_layers(loaded)
    assert len(qlayers) == 14
    for name, packed in out.packed.items():
        assert qlayers[name].spec == packed.spec
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, mem_logits, rtol=1e-5, atol=1e-5)
    # the summary's bit counts are the checkpoint's
    info = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert info["method"] == method and info["method_args"]["bits"] == kwargs["bits"]


def test_fp16_checkpoint_is_close(tmp_path, text_file):
    model = tiny_llama(seed=0)
    tok = byte_tokenizer()
    calib = load_calibration(text_file, tok, nsamples=4, seqlen=32)
    out = quantize_model(model, calib, QuantizeConfig("tacq", 3, outlier_frac=0.01), progress=False,
                         log=lambda *_: None)
    ids = torch.tensor([tok(TEXT[:100])["input_ids"]])
    with torch.no_grad():
        mem = model(input_ids=ids).logits
    ckpt = save_quantized(model, out.packed, tmp_path / "ckpt16", tok, method="tacq")  # default fp16 rest
    loaded = tacq_kernels.load(ckpt, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, mem, rtol=0, atol=2e-2)


def test_cli_quantize_inspect_eval(tmp_path, text_file, piqa_file, capsys):
    model_dir = save_tiny_model(str(tmp_path / "tiny"))
    out = str(tmp_path / "q")
    rc = main(["quantize", "--model", model_dir, "--method", "tacq", "--bits", "2", "--outlier-frac", "0.02",
               "--calib", text_file, "--nsamples", "4", "--seqlen", "40", "--out", out, "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "bits (all-inclusive)" in printed
    report = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert report["nnz"] == round(0.02 * report["numel"])
    assert main(["inspect", out, "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "14 quantized layers" in printed and f"{report['nnz']:,} sparse" in printed
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total"]["nnz"] == report["nnz"]
    assert info["total"]["bits_total"] == pytest.approx(report["bits_total"])
    res_json = str(tmp_path / "eval.json")
    rc = main(["eval", "--model", out, "--ppl", text_file, "--ppl-seqlen", "32", "--ppl-windows", "3",
               "--task", "piqa:" + piqa_file + "@all", "--json", res_json, "--quiet"])
    assert rc == 0
    res = json.loads(open(res_json).read())
    assert res["ppl"]["windows"] == 3 and math.isfinite(res["ppl"]["ppl"])
    assert res["task"]["items"] == 12
    # python -m tacq_quant is the same CLI
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tacq_quant", "inspect", out], capture_output=True, text=True)
    assert proc.returncode == 0 and "14 quantized layers" in proc.stdout


def test_perplexity_matches_a_manual_computation(text_file):
    model = tiny_llama(seed=4)
    tok = byte_tokenizer()
    res = perplexity(model, tok, text_file, seqlen=50, max_windows=3, batch_size=2, progress=False)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 50:(w + 1) * 50]
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0], -1)
            nll -= float(logp[torch.arange(49), x[1:]].sum())
            count += 49
    assert res["windows"] == 3 and res["windows_available"] == len(ids) // 50
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_multiple_choice_logprobs_match_one_by_one(piqa_file):
    model = tiny_llama(seed=5)
    tok = byte_tokenizer()
    reqs = [(tok("Question: a\nAnswer:")["input_ids"], tok(" yes")["input_ids"]),
            (tok("Q")["input_ids"], tok(" a much longer continuation here")["input_ids"]),
            (tok("Question: something else entirely\nAnswer:")["input_ids"], tok(" no")["input_ids"])]
    batched = continuation_logprobs(model, reqs, max_batch_tokens=1000, progress=False)
    with torch.no_grad():
        for (ctx, cont), got in zip(reqs, batched):
            x = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(input_ids=x).logits[0], -1)
            want = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    res = multiple_choice(model, tok, "piqa:" + piqa_file + "@all", progress=False)
    assert res["items"] == 12 and 0 <= res["acc_norm"] <= 1


@pytest.mark.parametrize("method,kwargs", [("gptq", dict(bits=3)), ("claq", dict(bits=2.2))])
def test_replayed_attention_and_mlp_give_the_same_checkpoint(text_file, monkeypatch, method, kwargs):
    """The true-sequential steps that replay the attention (o_proj of the kept attention output)
    and the MLP (down_proj of its kept input) give bit-identical layers to full forwards; a replay
    that disagrees with the full forward is detected and the layer falls back (same result)."""
    import warnings

    from tacq_quant import sequential

    tok = byte_tokenizer()

    def run():
        model = tiny_llama(seed=3)
        calib = load_calibration(text_file, tok, nsamples=6, seqlen=48, seed=2)
        out = quantize_model(model, calib, QuantizeConfig(method, **kwargs), progress=False, log=lambda *_: None,
                             batch_size=2)
        return out.packed

    calls = []
    original = sequential._CachedLlamaLayer.for_layer.__func__

    def counting(cls, *a, **k):
        got = original(cls, *a, **k)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(sequential._CachedLlamaLayer, "for_layer", classmethod(counting))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replay must agree: no fallback warning
        fast = run()
    assert calls and all(calls)
    monkeypatch.setattr(sequential._CachedLlamaLayer, "for_layer", classmethod(lambda cls, *a, **k: None))
    plain = run()
    for name, p in plain.items():
        assert p.spec == fast[name].spec
        for t, v in p.tensors.items():
            assert torch.equal(v, fast[name].tensors[t]), (name, t)

    # a replay that is wrong is caught on the first batch: warning, full forwards, same layers
    def wrong(self, *a, **k):
        return self.o_proj(self.attn_in[self.batch]) * 1.01, None

    monkeypatch.setattr(sequential._CachedLlamaLayer, "for_layer", classmethod(original))
    monkeypatch.setattr(sequential._CachedLlamaLayer, "_replay_attention", wrong)
    with pytest.warns(RuntimeWarning, match="falls back to full forwards"):
        broken = run()
    for name, p in plain.items():
        for t, v in p.tensors.items():
            assert torch.equal(v, broken[name].tensors[t]), (name, t)
