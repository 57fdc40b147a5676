"""Greedy generation with vllm.LLM for one or more checkpoints at one TP size; writes JSON.

    python engine_run.py SPEC.json OUT.json

SPEC: {"tp": 2, "checkpoints": {"name": dir, ...}, "prompts": [[ids...], ...], "max_tokens": 8,
       "dtype": "float32", "logprobs": 5}
OUT:  {"name": [{"tokens": [...], "logprobs": [{token_id: logprob, ...} per step]}, ...], ...,
       "_seconds": {"name": engine start-up + generation seconds}}

vLLM spawns its workers, so everything runs under ``if __name__ == "__main__"``.
"""

import gc
import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", True),
                            logprobs=spec.get("logprobs", 5))
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    out, seconds = {}, {}
    for name, ckpt in spec["checkpoints"].items():
        t0 = time.time()
        llm = LLM(model=ckpt, tensor_parallel_size=spec["tp"], dtype=spec.get("dtype", "float32"),
                  gpu_memory_utilization=0.15, max_model_len=256, max_num_seqs=8, enforce_eager=True,
                  distributed_executor_backend="mp" if spec["tp"] > 1 else "uni", seed=0)
        quant = llm.llm_engine.model_config.quantization
        res = llm.generate(prompts, params, use_tqdm=False)
        out[name] = [{"tokens": list(r.outputs[0].token_ids),
                      "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in r.outputs[0].logprobs],
                      "quantization": quant}
                     for r in res]
        seconds[name] = round(time.time() - t0, 1)
        del llm
        gc.collect()
    out["_seconds"] = seconds
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
