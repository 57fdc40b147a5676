"""Tiny quantized checkpoints and the transformers reference for the vLLM checks, in one place.

Used by the CPU tests (conftest.py, in .venv-vllm) and by the GPU check (benchmarks/vllm_gpu.py),
so both serve the same checkpoint kinds and compare against the same greedy reference. Imports no
pytest and no vLLM.
"""

import os

# The checkpoints the vLLM checks serve: one per kind the quantizer writes.
KINDS = {
    # TACQ 3-bit: one affine segment per row, outliers in CSR
    "tacq3": dict(method="tacq", bits=3, outlier_frac=0.01),
    # CLAQ 2.1 bits + outlier reservation: act-order permutation, 2- and 4-bit LUT segments, CSR
    "claq2.1": dict(method="claq", bits=2.1, reserve_outliers=True),
    # RTN 3-bit, groups of 32 (several groups per row: row-parallel cuts must fall on a group)
    "rtn3g32": dict(method="rtn", bits=3, group_size=32),
}
PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "tensor parallel"]


def make_checkpoints(root, kinds, dtype=None) -> dict:
    """{kind: checkpoint dir} under ``root``: a tiny Llama (hidden 256, 4 heads of 64, 2 KV heads,
    2 layers, byte tokenizer) quantized by tacq_quant in each of ``kinds`` (names of KINDS), its
    unquantized tensors saved in ``dtype`` (None: as the model holds them, fp32)."""
    from tacq_quant.data import load_calibration
    from tacq_quant.export import save_quantized
    from tacq_quant.pipeline import QuantizeConfig, quantize_model
    from tacq_quant.tiny import byte_tokenizer, tiny_llama

    root = os.fspath(root)
    text = os.path.join(root, "calib.txt")
    with open(text, "w") as f:
        f.write(("Tensor parallelism splits every linear layer across ranks. " * 8
                 + "Low-bit weights keep a few outliers in sixteen bits. ") * 30)
    out = {}
    for kind in kinds:
        kw = dict(KINDS[kind])
        method = kw.pop("method")
        model = tiny_llama(seed=0, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
        tok = byte_tokenizer()
        calib = load_calibration(text, tok, nsamples=4, seqlen=64, seed=1)
        res = quantize_model(model, calib, QuantizeConfig(method, **kw), progress=False, log=lambda *_: None)
        out[kind] = save_quantized(model, res.packed, os.path.join(root, kind), tok, method=method,
                                   method_args=res.method_args, dtype=dtype)
    return out


def hf_greedy(ckpt: str, prompts, max_tokens: int, device: str | None = None, dtype=None) -> list:
    """Greedy generation of exactly ``max_tokens`` tokens per prompt with transformers + tacq_kernels:
    per prompt {"prompt_ids", "tokens", "logprobs"} (one fp32 log-softmax per step, on the CPU).
    ``device``: where the model runs (None: the CPU); ``dtype``: its dtype (None: fp32)."""
    import torch

    import tacq_kernels
    from transformers import AutoTokenizer

    model = tacq_kernels.load(ckpt, device=device, dtype=dtype or torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    res = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device=device or "cpu")
            g = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=256,
                               temperature=None, top_p=None, top_k=None)
            new = g.sequences[0, ids.shape[1]:].tolist()
            logps = [torch.log_softmax(s[0].float(), -1).cpu() for s in g.scores]
            res.append({"prompt_ids": ids[0].tolist(), "tokens": new, "logprobs": logps})
    del model
    return res
