"""GPU check of the vLLM plugin (benchmarks/gpu_check.sh step `vllm-tp1`): our Triton kernels under vLLM, TP = 1.

    python benchmarks/vllm_gpu.py --out OUT.json [--work DIR] [--kinds claq2.1,tacq3,rtn3g32]

Quantizes a tiny Llama (hidden 256, 4 heads of 64, 2 KV heads, 2 layers) with each chosen kind
(default CLAQ 2.1 + outlier reservation: act-order, 2/4-bit LUT segments, CSR, i.e. every code
path of the kernels; also TACQ 3-bit and RTN 3-bit in groups of 32), serves it with vllm.LLM on
the GPU (fp16, CUDA graphs on for batch 1-8: the plugin tunes the kernels at weight processing,
before capture; one engine start-up per kind, so the gpu_check step runs one kind) and
compares greedy tokens and first-step log-probabilities with transformers + tacq_kernels on the
same GPU (the same Triton kernels through QuantLinear). Writes one JSON record; exit status 1
when a check fails. Needs vLLM (the CUDA build) importable; it is not installed here.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time

KINDS = {
    "tacq3": dict(method="tacq", bits=3, outlier_frac=0.01),
    "claq2.1": dict(method="claq", bits=2.1, reserve_outliers=True),
    "rtn3g32": dict(method="rtn", bits=3, group_size=32),
}
PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "tensor parallel"]
MAX_TOKENS = 16
TOL = 0.05  # nats, fp16 on both sides


def make_checkpoints(root, kinds):
    import torch

    from tacq_quant.data import load_calibration
    from tacq_quant.export import save_quantized
    from tacq_quant.pipeline import QuantizeConfig, quantize_model
    from tacq_quant.tiny import byte_tokenizer, tiny_llama

    text = os.path.join(root, "calib.txt")
    with open(text, "w") as f:
        f.write(("Tensor parallelism splits every linear layer across ranks. " * 8) * 30)
    out = {}
    for kind in kinds:
        kw = dict(KINDS[kind])
        method = kw.pop("method")
        model = tiny_llama(seed=0, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
        tok = byte_tokenizer()
        calib = load_calibration(text, tok, nsamples=4, seqlen=64, seed=1)
        res = quantize_model(model, calib, QuantizeConfig(method, **kw), progress=False, log=lambda *_: None)
        out[kind] = save_quantized(model, res.packed, os.path.join(root, kind), tok, method=method,
                                   method_args=res.method_args, dtype=torch.float16)
    return out


def hf_greedy(ckpt, prompts):
    import torch

    import tacq_kernels
    from transformers import AutoTokenizer

    model = tacq_kernels.load(ckpt, device="cuda", dtype=torch.float16).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    res = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device="cuda")
            g = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=256)
            res.append({"prompt_ids": ids[0].tolist(), "tokens": g.sequences[0, ids.shape[1]:].tolist(),
                        "first_logprobs": torch.log_softmax(g.scores[0][0].float(), -1).cpu()})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None)
    p.add_argument("--kinds", default="claq2.1", help="comma-separated, of " + ",".join(KINDS))
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"unknown kinds {unknown}; choose from {list(KINDS)}")
    from vllm import LLM, SamplingParams

    work = args.work or tempfile.mkdtemp(prefix="vllm_gpu_")
    ckpts = make_checkpoints(work, kinds)
    record = {"commit": os.environ.get("TACQ_COMMIT", "unknown"), "tp": 1, "dtype": "float16", "kinds": {}}
    ok = True
    for kind, ckpt in ckpts.items():
        hf = hf_greedy(ckpt, PROMPTS)
        t0 = time.time()
        # CUDA graphs on (enforce_eager=False): tuning must already be done when they are captured
        llm = LLM(model=ckpt, tensor_parallel_size=1, dtype="float16", gpu_memory_utilization=0.3, max_model_len=256,
                  seed=0, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
        startup = time.time() - t0
        outs = llm.generate([{"prompt_token_ids": h["prompt_ids"]} for h in hf],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1),
                            use_tqdm=False)
        equal, max_lp = 0, 0.0
        for h, o in zip(hf, outs):
            toks = list(o.outputs[0].token_ids)
            equal += toks == h["tokens"]
            t = toks[0]
            max_lp = max(max_lp, abs(o.outputs[0].logprobs[0][t].logprob - float(h["first_logprobs"][t])))
        rec = {"prompts": len(PROMPTS), "token_identical": equal, "max_first_step_logprob_diff": max_lp,
               "startup_s": round(startup, 1), "quantization": llm.llm_engine.model_config.quantization}
        rec["pass"] = rec["quantization"] == "tacq_kernels" and max_lp < TOL and equal >= len(PROMPTS) - 1
        ok &= rec["pass"]
        record["kinds"][kind] = rec
        print(kind, json.dumps(rec), flush=True)
        del llm
        gc.collect()
    record["pass"] = ok
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
