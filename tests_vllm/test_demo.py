"""The default model's TACQ checkpoint (`make demo`) under vLLM TP = 2 answers the demo prompt as `tacq generate` does.

Needs the checkpoint (135M parameters, minutes to make): set TACQ_VLLM_DEMO_CKPT to its directory
(`make demo` writes runs/demo). Skipped without it. Both sides: the chat template, greedy, fp32
on the CPU (what `tacq generate` uses there).
"""

import os

import pytest

from conftest import run_engine

DEMO = os.environ.get("TACQ_VLLM_DEMO_CKPT")
MAX_NEW = int(os.environ.get("TACQ_VLLM_DEMO_TOKENS", "32"))


@pytest.mark.skipif(not DEMO or not os.path.exists(os.path.join(DEMO or "", "config.json")),
                    reason="set TACQ_VLLM_DEMO_CKPT to the checkpoint `make demo` writes (runs/demo)")
def test_demo_checkpoint_tp2_answers_like_tacq_generate(tmp_path):
    import torch

    import tacq_kernels
    from tacq_quant.demo import DEFAULT_PROMPT
    from tacq_quant.generate import build_inputs, generate
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    model = tacq_kernels.load(DEMO, dtype=torch.float32).eval()
    want = generate(model, tok, DEFAULT_PROMPT, max_new_tokens=MAX_NEW)  # tacq generate's function
    ids = build_inputs(tok, DEFAULT_PROMPT)["input_ids"][0].tolist()
    del model
    res = run_engine({"tp": 2, "checkpoints": {"demo": DEMO}, "prompts": [ids], "max_tokens": MAX_NEW,
                      "logprobs": 1, "ignore_eos": False}, tmp_path, timeout=900)
    got = tok.decode(res["demo"][0]["tokens"], skip_special_tokens=True)
    print(f"prompt: {DEFAULT_PROMPT}\ntacq generate: {want.text!r}\nvLLM TP=2:     {got!r}\n"
          f"seconds: {res['_seconds']}")
    assert got == want.text
