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

# The checkpoint kinds, prompts and transformers reference are the CPU tests' own (no pytest there).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests_vllm"))
from tiny_checkpoints import KINDS, PROMPTS, hf_greedy, make_checkpoints  # noqa: E402

MAX_TOKENS = 16
TOL = 0.05  # nats, fp16 on both sides


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
    import torch

    ckpts = make_checkpoints(work, kinds, dtype=torch.float16)
    record = {"commit": os.environ.get("TACQ_COMMIT", "unknown"), "tp": 1, "dtype": "float16", "kinds": {}}
    ok = True
    for kind, ckpt in ckpts.items():
        hf = hf_greedy(ckpt, PROMPTS, MAX_TOKENS, device="cuda", dtype=torch.float16)
        gc.collect()
        torch.cuda.empty_cache()
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
            max_lp = max(max_lp, abs(o.outputs[0].logprobs[0][t].logprob - float(h["logprobs"][0][t])))
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
